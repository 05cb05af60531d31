"""PolicyLogps against the HF model's own logits (sequences run one at a time, unpadded),
simpo_objective against hand-worked values, and the total loss against TRL's CPOTrainer
(loss_type="simpo") on the same tiny model and batch."""

from __future__ import annotations

import gc
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from simpo_ray.train.logps import PolicyLogps, simpo_objective
from simpo_ray.train.loss import simpo_loss

torch.set_num_threads(1)
V = 64


def tiny_llama(seed: int = 0, vocab: int = V) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,  # peaked distributions, so log-probs differ between tokens
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


# (prompt, response) token ids; rejected responses of other lengths than chosen
CHOSEN = [([5, 9, 11, 7], [20, 21, 3]), ([6, 8], [30, 31, 32, 33, 3])]
REJECTED = [([5, 9, 11, 7], [40, 41, 42, 43, 44, 45, 3]), ([6, 8], [50, 3])]


def make_batch(pairs, extra_pad: int = 0):
    """Right-padded tensors; labels = input_ids with the prompt and padding at -100."""
    length = max(len(p) + len(r) for p, r in pairs) + extra_pad
    ids = torch.zeros(len(pairs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(pairs):
        seq = torch.tensor(p + r)
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = seq[len(p) :]
    return ids, mask, labels


def batch_args(extra_pad_rejected: int = 0):
    return (*make_batch(CHOSEN), *make_batch(REJECTED, extra_pad_rejected))


def reference_logps(model, pairs):
    """Mean and sum log p(response | prompt), one unpadded sequence per model call."""
    means, sums = [], []
    for prompt, response in pairs:
        ids = torch.tensor([prompt + response])
        logits = model(input_ids=ids).logits[0]
        logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        # token t is predicted by position t - 1
        tok = torch.stack([logp[t - 1, ids[0, t]] for t in range(len(prompt), ids.shape[1])])
        means.append(tok.mean())
        sums.append(tok.sum())
    return torch.stack(means), torch.stack(sums)


def test_policy_logps_match_separate_unpadded_runs():
    model = tiny_llama()
    out = PolicyLogps(model, chunk_size=3)(*batch_args())
    with torch.no_grad():
        ref_c, ref_c_sum = reference_logps(model, CHOSEN)
        ref_r, _ = reference_logps(model, REJECTED)
    torch.testing.assert_close(out["chosen_logps"], ref_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["rejected_logps"], ref_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["chosen_nll_sum"], -ref_c_sum.sum(), rtol=1e-5, atol=1e-5)
    assert out["chosen_tokens"].item() == 3 + 5
    assert out["rejected_tokens"].item() == 7 + 2
    # a meaningful comparison: values differ from uniform and from each other
    assert (ref_c + math.log(V)).abs().min() > 0.05
    assert (ref_c[0] - ref_c[1]).abs() > 0.05


def test_padding_does_not_change_logps():
    model = tiny_llama()
    plm = PolicyLogps(model, chunk_size=4)
    with torch.no_grad():
        a = plm(*batch_args())
        b = plm(*batch_args(extra_pad_rejected=5))
    for key in ("chosen_logps", "rejected_logps", "chosen_nll_sum"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_final_norm_is_applied():
    """The decoder's last hidden state must already include the final norm; perturbing the
    norm weight must move our log-probs exactly as it moves the model's own."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight.mul_(torch.linspace(0.2, 3.0, 32))
        out = PolicyLogps(model)(*batch_args())
        ref, _ = reference_logps(model, CHOSEN)
    torch.testing.assert_close(out["chosen_logps"], ref, rtol=1e-5, atol=1e-5)


def test_gradients_match_separate_runs():
    model = tiny_llama(seed=1).double()
    out = PolicyLogps(model, chunk_size=2)(*batch_args())
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(out["chosen_logps"].sum() - 2 * out["rejected_logps"].sum(), params)
    ref_c, _ = reference_logps(model, CHOSEN)
    ref_r, _ = reference_logps(model, REJECTED)
    want = torch.autograd.grad(ref_c.sum() - 2 * ref_r.sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in got)  # every parameter is used (DDP needs that)


def test_gemma2_softcapping():
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        final_logit_softcapping=0.5,  # small, so that it changes the log-probs a lot
        initializer_range=0.3,
        pad_token_id=0,
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(config).eval()
    plm = PolicyLogps(model)
    assert plm.softcap == 0.5
    with torch.no_grad():
        out = plm(*batch_args())
        ref, _ = reference_logps(model, CHOSEN)
    torch.testing.assert_close(out["chosen_logps"], ref, rtol=1e-5, atol=1e-5)

    unaware = PolicyLogps(model)
    unaware.softcap = None  # as if the softcap were not known: the first call must refuse
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        unaware(*batch_args())


@pytest.mark.parametrize(
    "arch, extra, scale",
    [("Cohere", {"logit_scale": 0.25}, 0.25), ("Granite", {"logits_scaling": 4.0}, 0.25)],
)
def test_logit_scaling_models(arch, extra, scale):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    plm = PolicyLogps(model)
    assert plm.logit_scale == scale
    with torch.no_grad():
        out = plm(*batch_args())
        ref, _ = reference_logps(model, REJECTED)
    torch.testing.assert_close(out["rejected_logps"], ref, rtol=1e-5, atol=1e-5)


class ScaledLlama(LlamaForCausalLM):
    """A head transform PolicyLogps does not know about."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


def test_unknown_head_transform_is_refused():
    torch.manual_seed(0)
    model = ScaledLlama(tiny_llama().config).eval()
    with pytest.raises(NotImplementedError, match="ScaledLlama"):
        PolicyLogps(model)(*batch_args())
    PolicyLogps(model, verify=False)(*batch_args())  # opting out skips the check


class LogitsOnly(nn.Module):
    """A causal LM exposing only full logits (no decoder / output embedding accessors)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.inner(input_ids=input_ids, attention_mask=attention_mask).logits)


def test_full_logits_fallback():
    model = tiny_llama()
    plm = PolicyLogps(LogitsOnly(model), chunk_size=3)
    assert not plm._split
    out = plm(*batch_args())
    with torch.no_grad():
        ref, _ = reference_logps(model, REJECTED)
    torch.testing.assert_close(out["rejected_logps"], ref, rtol=1e-5, atol=1e-5)
    out["chosen_logps"].sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_ddp_wraps_policy_logps(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    ddp = None
    try:
        model = tiny_llama()
        ddp = DistributedDataParallel(PolicyLogps(model))
        for _ in range(2):  # a second step fails if a parameter got no gradient
            loss, _ = simpo_objective(ddp(*batch_args()), beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.1)
            loss.backward()
        assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    finally:
        # DDP's reducer goes before its process group: freed after destroy_process_group, the
        # reducer's last reference ran gloo's destructor, which once hung joining a worker
        # thread in CI (in C++, where pytest-timeout cannot interrupt).
        del ddp
        gc.collect()
        dist.destroy_process_group()


# ---- simpo_objective -------------------------------------------------------------------------


def test_simpo_objective_hand_worked():
    chosen = torch.tensor([-0.5, -10.0, -1.0], requires_grad=True)
    rejected = torch.tensor([-0.1, -30.0, -21.0], requires_grad=True)
    nll_sum = torch.tensor(12.0, requires_grad=True)
    out = {
        "chosen_logps": chosen,
        "rejected_logps": rejected,
        "chosen_nll_sum": nll_sum,
        "chosen_tokens": torch.tensor(8),
        "rejected_tokens": torch.tensor(9),
    }
    loss, m = simpo_objective(out, beta=2.0, gamma_beta_ratio=0.25, sft_weight=0.3)
    simpo_mean = (math.log(1 + math.exp(1.3)) + 2 * math.log1p(math.exp(-39.5))) / 3
    assert loss.item() == pytest.approx(simpo_mean + 0.3 * 12.0 / 8, abs=1e-6)
    expected = {
        "loss": simpo_mean + 0.45,
        "sft_loss": 1.5,
        "rewards/chosen": (-1.0 - 20.0 - 2.0) / 3,
        "rewards/rejected": (-0.2 - 60.0 - 42.0) / 3,
        "rewards/accuracies": 2 / 3,
        "rewards/margins": (-0.8 + 40.0 + 40.0) / 3,
        "logps/chosen": -11.5 / 3,
        "logps/rejected": -51.1 / 3,
        "preference_accuracy": 2 / 3,
        "n_pairs": 3.0,
    }
    assert set(m) == set(expected)
    for key, value in expected.items():
        assert m[key].dim() == 0 and not m[key].requires_grad, key
        assert m[key].item() == pytest.approx(value, abs=1e-5), key
    loss.backward()
    assert nll_sum.grad.item() == pytest.approx(0.3 / 8)


def test_simpo_objective_without_sft_ignores_nll():
    out = {
        "chosen_logps": torch.tensor([-1.0, -2.0]),
        "rejected_logps": torch.tensor([-3.0, -1.0]),
        "chosen_nll_sum": torch.tensor(100.0),
        "chosen_tokens": torch.tensor(10),
        "rejected_tokens": torch.tensor(10),
    }
    loss, m = simpo_objective(out, beta=1.0, gamma_beta_ratio=0.0, loss_type="hinge")
    # hinge: relu(1 - 2) = 0, relu(1 + 1) = 2 -> mean 1
    assert loss.item() == pytest.approx(1.0)
    assert m["sft_loss"].item() == pytest.approx(10.0)
    assert m["preference_accuracy"].item() == pytest.approx(0.5)


# ---- agreement with TRL's CPOTrainer (loss_type="simpo") --------------------------------------


WORDS = "sort the numbers : one two three four five six seven eight nine ten".split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def preference_rows():
    return {
        "prompt": ["sort the numbers three one two :", "sort the numbers five four :", "sort six ten seven eight :"],
        "chosen": [" one two three", " four five", " six seven eight ten"],
        "rejected": [" three two one one", " five", " ten eight seven six six six"],
    }


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated")
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_total_loss_matches_trl_cpo_simpo(tmp_path, label_smoothing):
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    beta, gamma_beta_ratio, sft_weight = 2.0, 0.5, 0.3
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab=len(tokenizer))
    args = CPOConfig(
        output_dir=str(tmp_path),
        loss_type="simpo",
        beta=beta,
        # TRL's margin is absolute: logits - simpo_gamma / beta; ours is gamma_beta_ratio
        simpo_gamma=gamma_beta_ratio * beta,
        cpo_alpha=sft_weight,  # TRL's token-mean CE over chosen tokens, same as sft_loss
        label_smoothing=label_smoothing,  # same conservative-sigmoid formula as ours
        max_length=64,
        per_device_train_batch_size=3,
        report_to="none",
        use_cpu=True,
    )
    trainer = CPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict(preference_rows()), processing_class=tokenizer
    )
    features = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(features)
    model.eval()
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, batch)

    out = PolicyLogps(model)(
        batch["chosen_input_ids"],
        batch["chosen_attention_mask"],
        batch["chosen_labels"],
        batch["rejected_input_ids"],
        batch["rejected_attention_mask"],
        batch["rejected_labels"],
    )
    loss, metrics = simpo_objective(
        out,
        beta=beta,
        gamma_beta_ratio=gamma_beta_ratio,
        label_smoothing=label_smoothing,
        sft_weight=sft_weight,
    )
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert metrics["sft_loss"].item() == pytest.approx(trl_metrics["nll_loss"], abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-5), key
    # the SimPO part alone is non-trivial (not dominated by the SFT term)
    losses, _, _ = simpo_loss(out["chosen_logps"], out["rejected_logps"], beta=beta, gamma_beta_ratio=gamma_beta_ratio)
    assert losses.mean().item() > 0.1


# ------------------------------------------------------------------ torch_compile of the head

def _head_case(seed: int, length: int, vocab: int = 1000, hidden: int = 48):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, length, hidden, generator=g, requires_grad=True)
    w = (0.1 * torch.randn(vocab, hidden, generator=g)).requires_grad_()
    labels = torch.randint(0, vocab, (3, length), generator=g)
    labels[:, : length // 3] = -100  # prompts
    labels[1, -2:] = -100  # padding
    return h, w, labels


def _logps_and_grads(h, w, labels, compile):
    from simpo_ray.train.loss import token_logps

    total, n = token_logps(h, w, labels, chunk_size=16, compile=compile)
    (total.sum() * 0.01).backward()
    out = (total.detach().clone(), n, h.grad.clone(), w.grad.clone())
    h.grad, w.grad = None, None
    return out


@pytest.mark.slow  # inductor compiles C++ in worker processes
def test_the_compiled_head_gives_the_eager_values_and_gradients_and_compiles_once():
    """`torch_compile` of the per-chunk head: log-probs and the gradients of hidden states and
    head weight equal the eager path to 1e-5 (fp32) over lengths whose last chunk is partial;
    a second batch length compiles no new graph (the last chunk is padded to the chunk size)."""
    from torch._dynamo.utils import counters

    for seed, length in ((0, 37), (1, 50)):
        h, w, labels = _head_case(seed, length)
        eager = _logps_and_grads(h, w, labels, compile=False)
        graphs = counters["stats"]["unique_graphs"]
        fused = _logps_and_grads(h, w, labels, compile=True)
        for a, b in zip(eager, fused):
            assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-5), (a - b).abs().max()
        if seed == 1:
            assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled for the new length
    from simpo_ray.train.loss import _head_logps, compiled

    assert counters["stats"]["unique_graphs"] >= 1 and not compiled(_head_logps).failed  # it did compile


def test_a_head_that_fails_to_compile_runs_eagerly_with_one_line(capsys):
    """A compiler that raises (a backend that fails, as a missing C++ toolchain would): the
    values are the eager ones, one `[simpo-ray] torch_compile: ...` line on stderr, and later
    calls go straight to the eager function."""
    from simpo_ray.train.loss import CompiledHead, _chunked_label_logps, _head_logps

    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    head = CompiledHead(_head_logps, backend=no_compiler)
    h, w, labels = _head_case(2, 37)
    args = (w, None, 1.0, None)
    want, _ = _chunked_label_logps(h.detach(), labels, 16, _head_logps, *args)
    got, _ = _chunked_label_logps(h.detach(), labels, 16, head, *args)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6) and head.failed
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[simpo-ray] torch_compile: compiling the log-prob head failed")
    assert "no C++ compiler here" in err[0] and err[0].endswith("it runs eagerly")
    _chunked_label_logps(h.detach(), labels, 16, head, *args)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ torch_compile: true, the decoder blocks

def _policy_step(policy, pad):
    """One forward/backward of PolicyLogps on the test pairs with `pad` extra tokens (another length)."""
    out = policy(*batch_args(pad))
    loss = out["chosen_logps"].sum() - 0.5 * out["rejected_logps"].sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    return out["chosen_logps"].detach(), out["rejected_logps"].detach(), grads


@pytest.mark.slow  # inductor compiles C++ in worker processes
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_decoder_blocks_give_the_eager_values_and_gradients_and_stop_recompiling(checkpointing):
    """`torch_compile: true` compiles each decoder block in place: log-probs and every parameter's
    gradient equal the eager model's to 1e-5 (fp32) at three batch lengths, with activation
    checkpointing or without; the parameter names are unchanged (checkpoints and save_pretrained see
    the same model); the third length compiles no new graph (dynamo's automatic dynamic shapes), and
    the blocks share their graphs (fewer graphs than blocks x lengths)."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    from simpo_ray.train.logps import PolicyLogps
    from simpo_ray.train.model import enable_checkpointing

    torch._dynamo.reset()
    counters.clear()
    model = tiny_llama(7).train()
    twin = copy.deepcopy(model)
    if checkpointing:
        enable_checkpointing(model)
        enable_checkpointing(twin)
    eager = PolicyLogps(model, verify=False, compile=False)
    blocks = PolicyLogps(twin, verify=False, compile=False, compile_blocks=True)
    assert [n for n, _ in blocks.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert len(blocks._blocks.blocks) == 2
    graphs = []
    for pad in (0, 3, 9):
        want, got = _policy_step(eager, pad), _policy_step(blocks, pad)
        for a, b in zip(want[:2], got[:2]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
        assert want[2].keys() == got[2].keys() and len(want[2]) == len(list(model.parameters()))
        for name, g in want[2].items():
            assert torch.allclose(g, got[2][name], rtol=1e-5, atol=1e-5), (name, (g - got[2][name]).abs().max())
        graphs.append(counters["stats"]["unique_graphs"])
    assert blocks._blocks.active and graphs[0] >= 1  # it did compile, and did not fall back
    assert graphs[2] == graphs[1], graphs  # the third length: nothing new
    assert graphs[2] < 2 * 3, graphs       # not one graph per block per length


def test_decoder_blocks_that_fail_to_compile_run_eagerly_with_one_line(capsys):
    """A compiler that raises (as a missing toolchain or an unsupported op would): the values are
    the eager ones, one `[simpo-ray] torch_compile: ...` line, and the blocks are eager after."""
    import copy

    import torch._dynamo

    from simpo_ray.train.blocks import CompiledBlocks
    from simpo_ray.train.logps import PolicyLogps

    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    torch._dynamo.reset()
    model = tiny_llama(8)
    eager = PolicyLogps(copy.deepcopy(model), verify=False, compile=False)
    policy = PolicyLogps(model, verify=False, compile=False)
    policy._blocks = CompiledBlocks(model, backend=no_compiler)
    want = eager(*batch_args())
    got = policy(*batch_args())
    assert torch.allclose(got["chosen_logps"], want["chosen_logps"], atol=1e-6)
    assert not policy._blocks.active and all(b._compiled_call_impl is None for b in policy._blocks.blocks)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[simpo-ray] torch_compile: compiling the decoder blocks failed")
    assert "no C++ compiler here" in err[0] and err[0].endswith("they run eagerly")
    policy(*batch_args(2))
    assert capsys.readouterr().err == ""
