"""Policy log-probs of chosen and rejected responses (one concatenated forward) and the SimPO
objective with its logged metrics (Meng, Xia, Chen 2024, arXiv:2405.14734)."""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from torch import nn

from simpo_ray.data.collate import IGNORE_INDEX
from simpo_ray.train.loss import _StopRecomputationError, logits_token_logps, simpo_loss, token_logps


def _pad_right(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value)


def _shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, t+1] moved to position t (the hidden state that predicts it)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


# The fp32 logits of one log-prob chunk take at most this much (a chunk's size in tokens follows
# from the vocabulary): 64 MiB is 128 tokens of a 128k vocabulary and 2048 (the cap) of a small one.
LOGITS_CHUNK_BYTES = 64 * 2**20


# `torch_compile: null` compiles the head from this vocabulary size up (bench/step_vs_trl.py:
# 1.17x faster at 128k tokens on CPU, 1.18x slower at the bundled models' 51).
COMPILE_MIN_VOCAB = 32768


def logps_chunk_tokens(vocab_size: int) -> int:
    """Tokens per log-prob chunk for a vocabulary: the most whose fp32 logits fit LOGITS_CHUNK_BYTES."""
    return max(16, min(2048, LOGITS_CHUNK_BYTES // (4 * vocab_size)))


@contextlib.contextmanager
def _eager_blocks(blocks):
    """Compiled decoder blocks (`train.blocks`) run eagerly inside (torch.compiler's force_eager
    stance, this thread); nothing changes without them."""
    if blocks is None or not blocks.active:
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


class PolicyLogps(nn.Module):
    """A causal LM wrapped so that one call gives the SimPO inputs; DDP wraps this module whole.

    ``forward`` right-pads chosen and rejected to one length, runs ONE forward of the
    concatenated ``[2B, T]`` batch through the decoder, and computes label log-probs from the
    final hidden states and ``lm_head`` with ``token_logps`` (no ``[2B, T, V]`` logits). Labels
    are aligned to ``input_ids`` with the prompt and padding set to -100 (the reference SimPO
    tokenisation); the shift happens here. Inputs must be right-padded.

    Supported logit transforms: ``lm_head`` bias, Cohere ``logit_scale``, Granite
    ``logits_scaling``, Gemma 2 ``final_logit_softcapping``. Models without a separate decoder
    fall back to the model's full logits. With ``verify=True`` the first call checks, once, on
    one sequence in eval mode, that these log-probs equal the model's own ``log_softmax(logits)``
    and raises ``NotImplementedError`` if they do not (an unsupported head transform).
    """

    def __init__(self, model: nn.Module, *, chunk_size: int | None = None, verify: bool = True,
                 compile: bool | None = None, compile_blocks: bool = False):
        super().__init__()
        self.model = model
        # `torch_compile: true`: each decoder block through torch.compile too (train/blocks.py).
        self._blocks = None
        if compile_blocks:
            from simpo_ray.train.blocks import CompiledBlocks

            self._blocks = CompiledBlocks(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        # `token_logps(compile=...)`: the per-chunk head through torch.compile; None: where it helps.
        self.compile = compile if compile is not None else config.vocab_size >= COMPILE_MIN_VOCAB
        self.chunk_size = chunk_size or logps_chunk_tokens(config.vocab_size)
        self._verified = not verify
        self.softcap = getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_softcapping", None)
        self.logit_scale = float(getattr(config, "logit_scale", None) or 1.0)
        if getattr(config, "logits_scaling", None):
            self.logit_scale /= float(config.logits_scaling)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        decoder = self._decoder()
        # A model whose head is not a plain Linear, or whose "decoder" is the model itself, goes
        # through its own full logits instead.
        self._split = isinstance(head, nn.Linear) and decoder is not None and decoder is not model

    def generate(self, *args, **kwargs):
        """The wrapped model's `generate` (registered as an FSDP forward method when sharded, so
        the root's parameters are gathered for it). Compiled blocks run eagerly here: each decoding
        step changes the KV cache's shapes and state, which would recompile them step after step."""
        with _eager_blocks(self._blocks):
            return self.model.generate(*args, **kwargs)

    def _decoder(self) -> nn.Module | None:
        if hasattr(self.model, "get_decoder"):
            return self.model.get_decoder()
        return getattr(self.model, "model", None)

    def _sum_logps(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shifted = _shift_labels(labels)
        if not self._split:
            logits = self._through_blocks(lambda: self.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits)
            return logits_token_logps(logits, shifted, chunk_size=self.chunk_size)
        hidden = self._through_blocks(lambda: self._decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state)
        head = self.model.get_output_embeddings()
        return token_logps(
            hidden,
            head.weight,
            shifted,
            bias=head.bias,
            chunk_size=self.chunk_size,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            compile=self.compile,
        )

    def _through_blocks(self, run):
        """`run()`; if the compiled blocks fail where the eager ones do not, one line and eager blocks
        from then on (an error of the model itself is raised from the eager call)."""
        if self._blocks is None or not self._blocks.active:
            return run()
        try:
            with self._blocks.tracing():
                return run()
        except (torch.OutOfMemoryError, _StopRecomputationError):
            raise
        except Exception as e:  # noqa: BLE001 - a compiler's failure is any exception
            import torch.distributed as dist

            if dist.is_initialized() and dist.get_world_size() > 1:
                raise  # ranks falling back one by one would run mismatched collectives: fail the run
            self._blocks.eager()
            out = run()
            from simpo_ray.errors import one_line

            cause = getattr(e, "inner_exception", None) or e
            print(f"[simpo-ray] torch_compile: compiling the decoder blocks failed "
                  f"({one_line(cause, innermost=True, with_type=True, limit=300)}); they run eagerly",
                  file=sys.stderr, flush=True)
            return out

    @torch.no_grad()
    def _verify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            ids, mask, lab = input_ids[:1], attention_mask[:1], labels[:1]
            with _eager_blocks(self._blocks):  # one eval-mode check: no graphs of its own
                ours, n = self._sum_logps(ids, mask, lab)
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            shifted = _shift_labels(lab)
            keep = shifted != IGNORE_INDEX
            ref = logits.log_softmax(-1).gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            ref = (ref * keep).sum()
        finally:
            self.model.train(was_training)
        dtype = next(self.model.parameters()).dtype
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
        diff = (ours[0] - ref).abs().item() / max(int(n[0]), 1)
        if diff > tol:
            raise NotImplementedError(
                f"PolicyLogps: log-probs from decoder + lm_head differ from {type(self.model).__name__}'s own "
                f"logits by {diff:.3g} per token (tolerance {tol:g}); its output head applies a transform "
                "that is not supported (supported: bias, logit_scale, logits_scaling, final_logit_softcapping)"
            )

    def forward(
        self,
        chosen_input_ids: torch.Tensor,
        chosen_attention_mask: torch.Tensor,
        chosen_labels: torch.Tensor,
        rejected_input_ids: torch.Tensor,
        rejected_attention_mask: torch.Tensor,
        rejected_labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Returns ``chosen_logps``/``rejected_logps`` [B] (mean log-prob over response tokens;
        0 for a response with no tokens), ``chosen_nll_sum`` (scalar, sum of -log p over all
        chosen tokens of the batch), ``chosen_tokens``/``rejected_tokens`` (scalar counts)."""
        length = max(chosen_input_ids.shape[1], rejected_input_ids.shape[1])
        input_ids = torch.cat([_pad_right(chosen_input_ids, length, 0), _pad_right(rejected_input_ids, length, 0)])
        attention_mask = torch.cat(
            [_pad_right(chosen_attention_mask, length, 0), _pad_right(rejected_attention_mask, length, 0)]
        )
        labels = torch.cat(
            [_pad_right(chosen_labels, length, IGNORE_INDEX), _pad_right(rejected_labels, length, IGNORE_INDEX)]
        )
        if not self._verified:
            self._verify(input_ids, attention_mask, labels)
            self._verified = True
        sum_logps, n_tokens = self._sum_logps(input_ids, attention_mask, labels)
        avg_logps = sum_logps / n_tokens.clamp(min=1)
        n_chosen = chosen_input_ids.shape[0]
        return {
            "chosen_logps": avg_logps[:n_chosen],
            "rejected_logps": avg_logps[n_chosen:],
            "chosen_nll_sum": -sum_logps[:n_chosen].sum(),
            "chosen_tokens": n_tokens[:n_chosen].sum(),
            "rejected_tokens": n_tokens[n_chosen:].sum(),
        }


def simpo_objective(
    out: dict[str, torch.Tensor],
    *,
    beta: float,
    gamma_beta_ratio: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO loss plus optional SFT term: ``loss = mean(simpo_loss) + sft_weight * sft_loss``.

    ``sft_loss = chosen_nll_sum / chosen_tokens`` is the token-level mean cross-entropy over all
    chosen response tokens of the batch (as princeton-nlp/SimPO's trainer and TRL's CPO
    ``cpo_alpha`` term). Metrics are detached 0-dim tensors (so a trainer can all-reduce them)
    holding batch means: ``loss``, ``sft_loss``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies`` (chosen reward > rejected reward), ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected``, ``preference_accuracy`` (chosen avg logp > rejected,
    independent of beta), and ``n_pairs`` (the batch size, for weighting means across batches).
    """
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        out["chosen_logps"],
        out["rejected_logps"],
        beta=beta,
        gamma_beta_ratio=gamma_beta_ratio,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
    )
    sft_loss = out["chosen_nll_sum"] / out["chosen_tokens"].clamp(min=1)
    loss = losses.mean()
    if sft_weight:
        loss = loss + sft_weight * sft_loss
    chosen, rejected = out["chosen_logps"].detach(), out["rejected_logps"].detach()
    metrics = {
        "loss": loss.detach(),
        "sft_loss": sft_loss.detach(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen.mean(),
        "logps/rejected": rejected.mean(),
        "preference_accuracy": (chosen > rejected).float().mean(),
        "n_pairs": torch.tensor(float(chosen.shape[0]), device=chosen.device),
    }
    return loss, metrics
