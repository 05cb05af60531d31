"""The pieces of one training step that every worker runs: bf16 autocast over fp32 master
weights, gradient sync only on the last accumulation micro-batch, the SimPO objective of a
batch, the divergence check, agreement across ranks, and the running mean of step metrics.
No Ray here (`bench/gpu_check.py` runs these on a GPU without it)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist

from simpo_ray.config import TrainConfig
from simpo_ray.train.logps import simpo_objective


class DivergenceCheck:
    """Whether an optimizer step is healthy: finite loss and gradient norm, the loss not above
    `divergence_loss_threshold`, nor above `divergence_factor` x its level over the first 10 steps."""

    EARLY_STEPS = 10

    def __init__(self, cfg: TrainConfig) -> None:
        self.threshold = cfg.divergence_loss_threshold
        self.factor = cfg.divergence_factor
        self.early_losses: list[float] = []  # the scale an explosion is judged against

    def healthy(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        ok = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if self.threshold is not None:
            ok &= loss <= self.threshold
        if len(self.early_losses) < self.EARLY_STEPS:
            self.early_losses.append(float(loss))
        elif self.factor is not None:
            reference = max(sum(self.early_losses) / self.EARLY_STEPS, 1.0)
            ok &= loss <= self.factor * reference
        return ok


def autocast(cfg: TrainConfig, device, strategy: str = "ddp"):
    """bf16 compute over fp32 master weights when `bf16: true` (the reference trainer's mixed
    precision); under FSDP its MixedPrecisionPolicy casts the gathered parameters instead."""
    if not cfg.bf16 or strategy == "fsdp":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def gradient_sync(policy, strategy: str, sync: bool):
    """DDP: no gradient all-reduce on accumulation micro-batches (`no_sync`), one at the last.
    FSDP: gradients are reduce-scattered after every micro-batch, so each worker only ever holds
    its shard of them (the SimPO reference's ZeRO-3 does the same). FSDP2's no-sync accumulation
    (`set_requires_gradient_sync(False)`) would save those collectives but keeps unsharded fp32
    gradients of the whole model on every GPU until the last micro-batch (4 bytes x all
    parameters: +51 GB per GPU for a 14B model), which is what the memory plan cannot afford."""
    if strategy == "fsdp":
        return contextlib.nullcontext()
    return policy.no_sync() if (not sync and hasattr(policy, "no_sync")) else contextlib.nullcontext()


def forward_backward(policy, batch: dict[str, torch.Tensor], cfg: TrainConfig, objective: dict[str, Any],
                     device, strategy: str, sync: bool):
    """One accumulation micro-batch: the forward of the concatenated chosen+rejected batch, the
    SimPO objective, and the backward of loss / accumulation (gradient sync per `gradient_sync`).
    Returns (loss, metrics). The training loop, `trace` and `bench/gpu_check.py` all run this."""
    with gradient_sync(policy, strategy, sync):
        with autocast(cfg, device, strategy):
            out = policy(**pair_fields(batch))
        loss, metrics = objective_for(out, objective)
        (loss / cfg.gradient_accumulation_steps).backward()
    return loss, metrics


def zero_grad(optimizer, strategy: str) -> None:
    """After the optimizer step. DDP: gradients zeroed in place, so they stay views into DDP's
    all-reduce buckets (`gradient_as_bucket_view`); set to None, the next step's no-sync
    micro-batches would allocate a second full set beside the buckets (4 bytes x all
    parameters more: traced 80 vs 68 GB for the 3B space). FSDP: freed (sharded, re-created by
    the next reduce-scatter)."""
    optimizer.zero_grad(set_to_none=strategy != "ddp")


def pair_fields(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = ("chosen_input_ids", "chosen_attention_mask", "chosen_labels",
            "rejected_input_ids", "rejected_attention_mask", "rejected_labels")
    return {k: batch[k] for k in keys}


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())


def objective_for(out: dict[str, torch.Tensor], objective: dict[str, Any]):
    return simpo_objective(out, **objective)


def all_ranks(flag: torch.Tensor) -> bool:
    """True only when `flag` holds on every worker (a tiny all-reduce; keeps ranks in step)."""
    value = flag.to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


class MetricWindow:
    """Pair-weighted sums of the per-batch metrics since the last report."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.pairs = 0.0
        self.tokens = 0.0

    def add(self, metrics: dict[str, torch.Tensor], *, tokens: int) -> None:
        n = float(metrics["n_pairs"])
        for name, value in metrics.items():
            if name != "n_pairs":
                self.sums[name] = self.sums.get(name, 0.0) + float(value) * n
        self.pairs += n
        self.tokens += tokens

    def reduce(self, world: int) -> dict[str, float]:
        names = sorted(self.sums)
        vec = torch.tensor([self.sums[n] for n in names] + [self.pairs, self.tokens], dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(vec)
        pairs = max(vec[-2].item(), 1.0)
        reduced = {name: vec[i].item() / pairs for i, name in enumerate(names)}
        reduced["tokens"] = vec[-1].item()
        return reduced
