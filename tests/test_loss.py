"""simpo_loss against hand-worked values and analytic gradients; token_logps against the plain
full-logits computation, and its memory against the full [B, T, V] logits size."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from simpo_ray.errors import UserError
from simpo_ray.train.loss import simpo_loss, token_logps

torch.set_num_threads(1)

BETA, RATIO = 2.0, 0.25
CHOSEN = [-0.5, -10.0, -1.0]
REJECTED = [-0.1, -30.0, -21.0]
# logits = (c - r) - 0.25 = [-0.65, 19.75, 19.75]; beta * logits = [-1.3, 39.5, 39.5]


def _pair(dtype=torch.float32, grad=False):
    c = torch.tensor(CHOSEN, dtype=dtype, requires_grad=grad)
    r = torch.tensor(REJECTED, dtype=dtype, requires_grad=grad)
    return c, r


def test_sigmoid_hand_worked():
    c, r = _pair()
    losses, cr, rr = simpo_loss(c, r, beta=BETA, gamma_beta_ratio=RATIO)
    # -logsigmoid(-1.3) = log(1 + e^1.3) = 1.541015; -logsigmoid(39.5) = log(1 + e^-39.5) ~ 7e-18
    expected = [math.log(1 + math.exp(1.3)), math.log1p(math.exp(-39.5)), math.log1p(math.exp(-39.5))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert losses[0].item() == pytest.approx(1.5410, abs=1e-4)
    assert abs(losses[1].item()) < 1e-12 and abs(losses[2].item()) < 1e-12
    assert cr.tolist() == pytest.approx([-1.0, -20.0, -2.0])
    assert rr.tolist() == pytest.approx([-0.2, -60.0, -42.0])


def test_rewards_are_detached():
    c, r = _pair(grad=True)
    losses, cr, rr = simpo_loss(c, r, beta=BETA, gamma_beta_ratio=RATIO)
    assert losses.requires_grad
    assert not cr.requires_grad and not rr.requires_grad


def test_hinge_hand_worked():
    c, r = _pair()
    losses, _, _ = simpo_loss(c, r, beta=BETA, gamma_beta_ratio=RATIO, loss_type="hinge")
    # relu(1 - beta * logits) = relu(1 + 1.3), relu(1 - 39.5), relu(1 - 39.5)
    assert losses.tolist() == pytest.approx([2.3, 0.0, 0.0], abs=1e-6)
    # a margin just inside the hinge: c - r = 0.5, logits 0.25, 1 - 2 * 0.25 = 0.5
    losses, _, _ = simpo_loss(
        torch.tensor([-1.0]), torch.tensor([-1.5]), beta=BETA, gamma_beta_ratio=RATIO, loss_type="hinge"
    )
    assert losses.item() == pytest.approx(0.5, abs=1e-6)


def test_label_smoothing_hand_worked():
    c, r = _pair()
    eps = 0.1
    losses, _, _ = simpo_loss(c, r, beta=BETA, gamma_beta_ratio=RATIO, label_smoothing=eps)

    def softplus(x):  # -logsigmoid(-x)
        return math.log1p(math.exp(x)) if x < 30 else x + math.log1p(math.exp(-x))

    # -(1-eps) logsigmoid(z) - eps logsigmoid(-z) = (1-eps) softplus(-z) + eps softplus(z)
    expected = [(1 - eps) * softplus(-z) + eps * softplus(z) for z in (-1.3, 39.5, 39.5)]
    assert expected[0] == pytest.approx(0.9 * 1.541015 + 0.1 * 0.241015, abs=1e-5)
    assert expected[1] == pytest.approx(3.95, abs=1e-6)
    assert losses.tolist() == pytest.approx(expected, abs=1e-5)


def test_hinge_with_label_smoothing_is_user_error():
    c, r = _pair()
    with pytest.raises(UserError, match="label_smoothing"):
        simpo_loss(c, r, beta=BETA, gamma_beta_ratio=RATIO, loss_type="hinge", label_smoothing=0.1)


def test_unknown_loss_type_is_user_error():
    c, r = _pair()
    with pytest.raises(UserError, match="ipo.*sigmoid, hinge"):
        simpo_loss(c, r, beta=BETA, gamma_beta_ratio=RATIO, loss_type="ipo")


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_sigmoid_gradient_is_analytic(eps):
    c, r = _pair(torch.float64, grad=True)
    losses, _, _ = simpo_loss(c, r, beta=BETA, gamma_beta_ratio=RATIO, label_smoothing=eps)
    losses.sum().backward()
    z = (c - r - RATIO).detach()
    # dL/dz = -beta (1-eps) sigmoid(-beta z) + beta eps sigmoid(beta z); dL/dc = dL/dz = -dL/dr
    dz = -BETA * (1 - eps) * torch.sigmoid(-BETA * z) + BETA * eps * torch.sigmoid(BETA * z)
    torch.testing.assert_close(c.grad, dz)
    torch.testing.assert_close(r.grad, -dz)
    assert c.grad[0].item() == pytest.approx(-2 * (1 - eps) / (1 + math.exp(-1.3)) + 2 * eps / (1 + math.exp(1.3)))


def test_hinge_gradient_is_analytic():
    c, r = _pair(torch.float64, grad=True)
    losses, _, _ = simpo_loss(c, r, beta=BETA, gamma_beta_ratio=RATIO, loss_type="hinge")
    losses.sum().backward()
    assert c.grad.tolist() == [-BETA, 0.0, 0.0]
    assert r.grad.tolist() == [BETA, 0.0, 0.0]


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    fn = lambda a, b: simpo_loss(a, b, beta=1.5, gamma_beta_ratio=0.3, label_smoothing=0.1)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (c, r))


# ---- token_logps -------------------------------------------------------------------------


def _naive_logps(hidden, weight, labels, bias=None, logit_scale=1.0, softcap=None):
    up = lambda x: x.to(torch.promote_types(x.dtype, torch.float32))  # noqa: E731
    logits = (up(hidden) @ up(weight).T + (0 if bias is None else up(bias))) * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    mask = labels != -100
    lp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1), mask.sum(-1)


def _inputs(B=3, T=7, H=16, V=50, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    labels[1, 5:] = -100
    labels[2, ::2] = -100  # 3 + 2 + 4 = 9 ignored of 21 -> 12 kept
    return hidden, weight, b, labels


@pytest.mark.parametrize("chunk_size", [1, 5, 12, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_token_logps_matches_full_logits(chunk_size, bias):
    hidden, weight, b, labels = _inputs(bias=bias)
    sums, n = token_logps(hidden, weight, labels, bias=b, chunk_size=chunk_size)
    ref_sums, ref_n = _naive_logps(hidden, weight, labels, bias=b)
    assert n.tolist() == [4, 5, 3] == ref_n.tolist()
    assert sums.dtype == torch.float64
    torch.testing.assert_close(sums, ref_sums, rtol=1e-10, atol=1e-10)

    params = [hidden, weight] + ([b] if bias else [])
    coef = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)  # a non-uniform upstream gradient
    grads = torch.autograd.grad((sums * coef).sum(), params)
    ref_grads = torch.autograd.grad((ref_sums * coef).sum(), params)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert grads[0][0, :3].abs().sum() == 0  # ignored positions get no gradient


def test_token_logps_scale_and_softcap():
    hidden, weight, _, labels = _inputs(seed=1)
    sums, _ = token_logps(hidden, weight, labels, chunk_size=5, logit_scale=0.5, softcap=3.0)
    ref, _ = _naive_logps(hidden, weight, labels, logit_scale=0.5, softcap=3.0)
    torch.testing.assert_close(sums, ref, rtol=1e-10, atol=1e-10)
    # softcapping matters at these logit sizes, so the check above can fail
    plain, _ = _naive_logps(hidden, weight, labels, logit_scale=0.5)
    assert (plain - ref).abs().max() > 0.1


def test_token_logps_bf16_inputs():
    hidden, weight, _, labels = _inputs(seed=2)
    h16, w16 = hidden.detach().bfloat16(), weight.detach().bfloat16()
    sums, _ = token_logps(h16, w16, labels, chunk_size=4)
    assert sums.dtype == torch.float32
    ref, _ = _naive_logps(h16, w16, labels)  # same bf16 values, fp32 arithmetic
    torch.testing.assert_close(sums, ref, rtol=2e-2, atol=0.3)


def test_token_logps_all_ignored_row():
    hidden, weight, _, labels = _inputs()
    labels[1] = -100
    sums, n = token_logps(hidden, weight, labels, chunk_size=4)
    assert n[1].item() == 0 and sums[1].item() == 0.0


# ---- memory --------------------------------------------------------------------------------


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created (and still alive) while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live, self.refs, self.current, self.peak = {}, {}, 0, 0

    def _free(self, key):
        self.current -= self.live.pop(key)
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    self.refs[key] = weakref.ref(storage, lambda _, k=key: self._free(k))
        return out


def _saved_for_backward_bytes(fn, exclude):
    """Bytes of distinct storages autograd saves for backward, excluding the given leaves."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


def test_memory_far_below_full_logits():
    B, T, H, V = 2, 128, 8, 128_000
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.1).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :16] = -100  # prompt positions
    full = B * T * V * 4  # one fp32 [B, T, V] tensor: 131 MB

    def ours():
        return token_logps(hidden, weight, labels, chunk_size=8)[0].sum()

    def naive():
        return _naive_logps(hidden, weight, labels)[0].sum()

    loss, saved = _saved_for_backward_bytes(ours, [hidden, weight])
    _, naive_saved = _saved_for_backward_bytes(naive, [hidden, weight])
    assert saved < 0.01 * full  # only the kept hidden rows and indices
    assert naive_saved >= full

    with PeakMemory() as ours_peak:
        ours().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with PeakMemory() as naive_peak:
        naive().backward()
    assert ours_peak.peak < 0.25 * full
    assert naive_peak.peak >= 2 * full
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-4, atol=1e-6)
