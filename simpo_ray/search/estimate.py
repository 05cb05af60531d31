"""The dry run's cost model: GPU hours of one trial and of a whole search, from a space."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from simpo_ray.errors import ConfigError

if TYPE_CHECKING:
    from simpo_ray.search.space import SearchSpace

H100_BF16_DENSE_TFLOPS = 989.0   # H100 SXM, dense bf16 tensor-core peak (the default peak_tflops)


def estimate_gpu_hours(space: SearchSpace) -> dict[str, Any]:
    """GPU hours of one trial and of the whole search, from the space's `estimate` block.

    steps = max_steps, or ceil(epochs * ceil(train_pairs / effective_batch)), capped at the
    scheduler's max_t; tokens = steps * effective_batch * tokens_per_pair; model FLOPs =
    6 * N * tokens (forward + backward of the one concatenated chosen+rejected pass; SimPO
    has no reference model); GPU seconds = FLOPs / (peak_tflops * 1e12 * mfu). Assumes H100
    bf16 dense peak 989 TFLOP/s and MFU 0.35 unless the space says otherwise; evaluation,
    data preparation and start-up are not counted.

    Whole search: `gpu_hours_upper_bound` = num_samples full trials. `gpu_hours_asha_estimate`
    (asha only) assumes each rung keeps 1/reduction_factor of the trials that reach it, as in
    synchronous successive halving; asynchronous promotion lets somewhat more trials through
    early, so read it as a lower estimate and the upper bound as the budget.
    """
    if space.estimate is None:
        raise ConfigError(f"{space.source}: estimate: missing; add estimate: {{train_pairs, "
                          "params_billion, tokens_per_pair}} for the GPU-hour estimate")
    e, s = space.estimate, space.search
    cfg = space.trial_config()
    eb = space.effective_batch
    steps_per_epoch = math.ceil(e.train_pairs / eb)
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    steps_per_report = {"step": 1.0, "samples": 1 / eb, "tokens": 1 / (eb * e.tokens_per_pair),
                        "training_iteration": float(cfg.eval_steps)}[s.time_attr]
    if s.scheduler != "fifo":
        steps = min(steps, math.ceil(s.max_t * steps_per_report))
    tokens = steps * eb * e.tokens_per_pair
    flops_per_step = 6 * e.params_billion * 1e9 * eb * e.tokens_per_pair
    gpu_hours_per_step = flops_per_step / (e.peak_tflops * 1e12 * e.mfu) / 3600
    per_trial = steps * gpu_hours_per_step
    out: dict[str, Any] = {
        "effective_batch": eb,
        "steps_per_epoch": steps_per_epoch,
        "steps_per_trial": steps,
        "tokens_per_trial": tokens,
        "flops_per_trial": steps * flops_per_step,
        "gpus_per_trial": space.resources.gpus_per_trial,
        "gpu_hours_per_trial": per_trial,
        "wall_hours_per_trial": (per_trial / space.resources.gpus_per_trial
                                 if space.resources.gpus_per_trial else None),
        "num_samples": s.num_samples,
        "gpu_hours_upper_bound": per_trial * s.num_samples,
        "asha_expected_steps_per_trial": None,
        "gpu_hours_asha_estimate": None,
        "assumptions": {"flops_per_token": "6 * params (model FLOPs, no recompute)",
                        "peak_tflops": e.peak_tflops, "mfu": e.mfu,
                        "device": "H100 SXM bf16 dense" if e.peak_tflops == H100_BF16_DENSE_TFLOPS
                        else "custom peak"},
    }
    if s.scheduler == "asha":
        grace = s.grace_period * steps_per_report
        expected = _asha_expected_steps(steps, grace, s.reduction_factor)
        out["asha_expected_steps_per_trial"] = expected
        out["gpu_hours_asha_estimate"] = expected * gpu_hours_per_step * s.num_samples
    return out


def _asha_expected_steps(total: float, grace: float, eta: float) -> float:
    """Mean steps per trial if a 1/eta share of the trials passes each rung (grace * eta^k)."""
    expected, prev, survive = 0.0, 0.0, 1.0
    rung = grace
    while rung < total:
        expected += survive * (rung - prev)
        prev, survive, rung = rung, survive / eta, rung * eta
    return expected + survive * (total - prev)
