"""SimPO loss and memory-lean token log-probabilities, as pure functions of tensors.

SimPO: Meng, Xia, Chen (2024), "SimPO: Simple Preference Optimization with a Reference-Free
Reward", arXiv:2405.14734.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # raised through the function when checkpoint's recomputation stops early (not an error)
    from torch.utils.checkpoint import _StopRecomputationError
except ImportError:  # pragma: no cover - other torch versions
    class _StopRecomputationError(Exception):
        pass

from simpo_ray.data.collate import IGNORE_INDEX
from simpo_ray.errors import UserError

LOSS_TYPES = ("sigmoid", "hinge")


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float,
    gamma_beta_ratio: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO loss (Meng et al. 2024, arXiv:2405.14734).

    Inputs are length-normalised log-probs, ``(1/|y|) log pi(y|x)``, one per pair. With
    ``logits = (chosen_logps - rejected_logps) - gamma_beta_ratio`` (the paper's margin
    ``gamma = gamma_beta_ratio * beta`` divided by ``beta``):

    - ``sigmoid``: ``-(1 - eps) * logsigmoid(beta * logits) - eps * logsigmoid(-beta * logits)``
      (``eps = label_smoothing``; ``eps = 0`` is the paper's loss),
    - ``hinge``:   ``relu(1 - beta * logits)`` (label smoothing not defined).

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each shaped like the inputs; the
    rewards are ``beta * logps``, detached (for logging only).
    """
    if loss_type not in LOSS_TYPES:
        raise UserError(f"loss_type {loss_type!r} is not supported; allowed: {', '.join(LOSS_TYPES)}")
    logits = (chosen_logps - rejected_logps) - gamma_beta_ratio
    if loss_type == "sigmoid":
        losses = (
            -(1.0 - label_smoothing) * F.logsigmoid(beta * logits)
            - label_smoothing * F.logsigmoid(-beta * logits)
        )
    else:
        if label_smoothing > 0:
            raise UserError(
                f"label_smoothing={label_smoothing} is not defined for loss_type 'hinge'; "
                "use label_smoothing 0.0 or loss_type 'sigmoid'"
            )
        losses = torch.relu(1.0 - beta * logits)
    chosen_rewards = beta * chosen_logps.detach()
    rejected_rewards = beta * rejected_logps.detach()
    return losses, chosen_rewards, rejected_rewards


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _log_softmax_at(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = _upcast(logits)
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _head_logps(hidden, targets, weight, bias, logit_scale, softcap):
    """log p(target) for ``hidden`` [N, H] rows through the output head; fp32 (or fp64) logits."""
    logits = _upcast(F.linear(hidden, weight, bias))
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return _log_softmax_at(logits, targets)


class CompiledHead:
    """`torch.compile` of a per-chunk function, with one shape per chunk size (`dynamic=False`;
    the caller pads the last chunk, so a batch of any length compiles nothing new) and a fall
    back: if a compiled call raises and the eager call does not, one warning line says why and
    this process computes that function eagerly from then on (an eager error is raised as is)."""

    def __init__(self, fn, backend: str | object = "inductor") -> None:
        self.fn, self.backend, self.failed = fn, backend, False
        self._compiled = None

    def __call__(self, *args):
        if self.failed:
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=False, backend=self.backend)
        try:
            return self._compiled(*args)
        except (torch.OutOfMemoryError, _StopRecomputationError):  # the latter: checkpoint's own control flow
            raise
        except Exception as e:  # noqa: BLE001 - a compiler's failure is any exception
            out = self.fn(*args)  # an error of the function itself is raised from here
            self.failed = True
            from simpo_ray.errors import one_line

            cause = getattr(e, "inner_exception", None) or e  # dynamo's BackendCompilerFailed wraps it
            print(f"[simpo-ray] torch_compile: compiling the log-prob head failed "
                  f"({one_line(cause, innermost=True, with_type=True, limit=300)}); it runs eagerly",
                  file=sys.stderr, flush=True)
            return out


_COMPILED: dict[object, CompiledHead] = {}


def compiled(fn) -> CompiledHead:
    """The process's one `CompiledHead` of `fn` (compiled graphs are cached by torch per shape)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = CompiledHead(fn)
    return _COMPILED[fn]


def _chunked_label_logps(features, labels, chunk_size, fn, *fn_args):
    """Sum over each sequence of ``fn(rows, targets, *fn_args)``, evaluated only at positions
    whose label is not -100, ``chunk_size`` rows at a time, each chunk checkpointed. A
    `CompiledHead` ``fn`` gets every chunk at ``chunk_size`` rows (the last one padded with rows
    of zeros and target 0, whose values are dropped), so it compiles once."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, seq_len = labels.shape
    if features.shape[:2] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {tuple(features.shape)}")
    flat_labels = labels.reshape(-1)
    keep = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    rows = features.reshape(batch * seq_len, -1).index_select(0, keep)
    targets = flat_labels.index_select(0, keep)
    n = rows.shape[0]
    if isinstance(fn, CompiledHead) and n % chunk_size:
        pad = chunk_size - n % chunk_size
        rows, targets = F.pad(rows, (0, 0, 0, pad)), F.pad(targets, (0, pad))
    pieces = [
        checkpoint(fn, rows[i : i + chunk_size], targets[i : i + chunk_size], *fn_args, use_reentrant=False)
        for i in range(0, rows.shape[0], chunk_size)
    ]
    if pieces and rows.shape[0] != n:
        pieces[-1] = pieces[-1][: chunk_size - (rows.shape[0] - n)]
    dtype = torch.promote_types(rows.dtype, torch.float32)
    per_token = torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=dtype)
    seq_index = torch.div(keep, seq_len, rounding_mode="floor")
    sum_logps = per_token.new_zeros(batch).index_add(0, seq_index, per_token)
    return sum_logps, (labels != IGNORE_INDEX).sum(-1)


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 512,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of label-token log-probs per sequence, without materialising ``[B, T, V]`` logits.

    ``log p(y_t) = z_t[y_t] - logsumexp(z_t)`` with ``z_t = logit_scale * (W h_t + b)``, then
    ``softcap * tanh(z_t / softcap)`` when ``softcap`` is set (Gemma 2). ``labels`` [B, T] are
    already aligned to ``hidden`` [B, T, H] (the caller shifts); ``-100`` positions are
    dropped before any logits are computed. The kept positions are processed ``chunk_size``
    rows at a time, each under ``torch.utils.checkpoint``: only the selected hidden rows are
    kept for backward, and one chunk's ``[chunk_size, V]`` fp32 logits are recomputed there.
    ``hidden``/``weight`` may be bf16; logits are upcast to fp32 before the logsumexp.

    ``compile``: the per-chunk head runs through `torch.compile` (`CompiledHead`: one graph per
    chunk size, eager if compiling fails); the same values to fp32 rounding.

    Returns ``(sum_logps [B] fp32 (fp64 for fp64 inputs), n_tokens [B] int64)``.
    """
    fn = compiled(_head_logps) if compile else _head_logps
    return _chunked_label_logps(hidden, labels, chunk_size, fn, weight, bias, logit_scale, softcap)


def logits_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logps`` for models that only give full logits [B, T, V] (no separate decoder).

    The logits exist already; this avoids keeping an fp32 log_softmax copy for backward
    (fp32 logsumexp per chunk of kept positions, under checkpointing).
    """
    return _chunked_label_logps(logits, labels, chunk_size, _log_softmax_at)
