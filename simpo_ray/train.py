"""The SimPO loop that every Ray Train worker runs (DDP: gloo on CPU, nccl on GPU).

It trains, evaluates every `eval_steps`, checkpoints its state, stops on divergence, and
reports metrics with `ray.train.report`; it knows nothing about Tune (whoever launched the run,
`simpo_ray.launch`, forwards the reports). `python -m simpo_ray.train` is `simpo_ray.cli`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from simpo_ray import ray_workarounds
from simpo_ray.config import TrainConfig, from_dict
from simpo_ray.errors import UserError

# Metrics whose worst value is known a priori (they are shares in [0, 1], higher is better).
# A diverged run reports them as 0.0 so that a searcher ranks it last.
BOUNDED_EVAL_METRICS = ("eval/preference_accuracy", "eval/rewards/accuracies", "eval/success_rate")
STATE_FILE = "trainer_state.pt"


def is_bundled_task(cfg: TrainConfig) -> bool:
    return all(name.startswith("bundled:") for name in cfg.dataset_mixer)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point.

    `config` holds `train` (a TrainConfig dict), `data` (the tokenised train/eval datasets,
    as object-store references or cache paths, prepared once by the driver) and `threads`.
    """
    t_start = time.perf_counter()  # start-up includes the imports below
    cfg = from_dict(config["train"])
    ray_workarounds.quiet_train_logs()
    import transformers

    transformers.utils.logging.disable_progress_bar()  # weight loading/saving bars on every checkpoint
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    from simpo_ray.tokens import PairCollator
    from simpo_ray.shared_data import load_shared
    from simpo_ray.logps import PolicyLogps
    from simpo_ray.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, device=device)
    train_ds = load_shared(config["data"]["train"])
    eval_ds = load_shared(config["data"]["eval"])
    collator = PairCollator(tokenizer.pad_token_id)

    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_ds, batch_size=cfg.per_device_train_batch_size, sampler=sampler,
                        collate_fn=collator, drop_last=True)
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)
    if len(loader) < cfg.gradient_accumulation_steps:
        raise UserError(
            f"the training split has {len(train_ds)} pairs: too few for one optimizer step of "
            f"{cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps} x {world} workers"
        )

    policy = ray.train.torch.prepare_model(PolicyLogps(model))
    bare = getattr(policy, "module", policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(loader) // cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_train_epochs)
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer,
                              num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)

    state = {"step": 0, "samples": 0, "tokens": 0, "epoch": 0, "batch_in_epoch": 0, "train_time_s": 0.0,
             "restarts": 0}
    _load_checkpoint(ray.train.get_checkpoint(), bare, optimizer, scheduler, state, device, rank)

    objective = dict(beta=cfg.beta, gamma_beta_ratio=cfg.gamma_beta_ratio, loss_type=cfg.loss_type,
                     label_smoothing=cfg.label_smoothing, sft_weight=cfg.sft_weight)
    save_every = cfg.save_steps or cfg.eval_steps
    window = MetricWindow()
    startup_s = time.perf_counter() - t_start
    window_start = time.perf_counter()
    micro = 0
    divergence = DivergenceCheck(cfg)
    done = state["step"] >= total_steps
    if state["step"] == 0:
        # The starting point (the SFT model), so every curve and every "did it improve" has a baseline.
        baseline = evaluate(policy, bare, tokenizer, eval_ds, collator, cfg, objective, device, rank, world)
        report = {**baseline, "step": 0, "epoch": 0.0, "samples": 0, "tokens": 0,
                  "learning_rate": scheduler.get_last_lr()[0], "train_time_s": 0.0,
                  "startup_s": startup_s, "total_steps": total_steps, "diverged": 0, "status": "running"}
        ray.train.report(report)
        if rank == 0:
            print(_progress_line(report), flush=True)
        window_start = time.perf_counter()

    while not done:
        sampler.set_epoch(state["epoch"])
        for batch_index, batch in enumerate(loader):
            if batch_index < state["batch_in_epoch"]:  # replay the epoch's order up to a resume point
                continue
            t0 = time.perf_counter()
            sync = (micro + 1) % cfg.gradient_accumulation_steps == 0
            with policy.no_sync() if (not sync and hasattr(policy, "no_sync")) else contextlib.nullcontext():
                with _autocast(cfg, device):
                    out = policy(**_pair_fields(batch))
                loss, metrics = simpo_objective_for(out, objective)
                (loss / cfg.gradient_accumulation_steps).backward()
            window.add(metrics, tokens=_tokens(batch))
            micro += 1
            state["batch_in_epoch"] = batch_index + 1
            state["samples"] += batch["chosen_input_ids"].shape[0] * world
            if not sync:
                state["train_time_s"] += time.perf_counter() - t0
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            if not _all_ranks(divergence.healthy(metrics["loss"].detach(), grad_norm)):
                state["step"] += 1
                _report_diverged(state, window, startup_s, rank)
                return
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["train_time_s"] += time.perf_counter() - t0
            done = state["step"] >= total_steps
            if state["step"] % cfg.eval_steps == 0 or done:
                window_s = time.perf_counter() - window_start
                train_metrics = window.reduce(world)
                tokens_in_window = train_metrics.pop("tokens")
                state["tokens"] += int(tokens_in_window)
                eval_metrics = evaluate(policy, bare, tokenizer, eval_ds, collator, cfg, objective, device, rank, world)
                report = {
                    **train_metrics, **eval_metrics,
                    "step": state["step"], "epoch": state["epoch"] + state["batch_in_epoch"] / len(loader),
                    "samples": state["samples"], "tokens": state["tokens"],
                    "learning_rate": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens_in_window / max(window_s, 1e-9),
                    "train_time_s": state["train_time_s"], "startup_s": startup_s,
                    "total_steps": total_steps, "diverged": 0, "restarts": state["restarts"],
                    "status": "completed" if done else "running",
                }
                ckpt = state["step"] % save_every == 0 or done
                _report(report, bare, optimizer, scheduler, state, tokenizer, rank, with_checkpoint=ckpt)
                if rank == 0:
                    print(_progress_line(report), flush=True)
                window = MetricWindow()
                window_start = time.perf_counter()
            if done:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0


def _load_checkpoint(checkpoint, bare, optimizer, scheduler, state: dict, device, rank: int) -> None:
    """Continue from a checkpoint that `_report` wrote (a restart after a worker failure, via
    Ray Train's FailureConfig): model, optimizer, scheduler and counters; reports then carry how
    often this run was restarted."""
    if not checkpoint:
        return
    with checkpoint.as_directory() as ckpt_dir:
        saved = torch.load(Path(ckpt_dir) / STATE_FILE, map_location=device, weights_only=False)
    bare.model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state.update(saved["counters"])
    state["restarts"] = state.get("restarts", 0) + 1
    if rank == 0:
        print(f"[simpo-ray] resumed from checkpoint at step {state['step']} "
              f"(restart {state['restarts']})", flush=True)


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


def _autocast(cfg: TrainConfig, device):
    """bf16 compute over fp32 master weights when `bf16: true` (the reference trainer's mixed precision)."""
    if not cfg.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _pair_fields(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = ("chosen_input_ids", "chosen_attention_mask", "chosen_labels",
            "rejected_input_ids", "rejected_attention_mask", "rejected_labels")
    return {k: batch[k] for k in keys}


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())


def simpo_objective_for(out: dict[str, torch.Tensor], objective: dict[str, Any]):
    from simpo_ray.logps import simpo_objective

    return simpo_objective(out, **objective)


def _all_ranks(flag: torch.Tensor) -> bool:
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


@torch.no_grad()
def evaluate(policy, bare, tokenizer, eval_ds, collator, cfg: TrainConfig, objective, device, rank, world):
    """Held-out metrics, sharded across workers and all-reduced.

    `eval/preference_accuracy` (share of pairs whose average log-prob of chosen exceeds
    rejected) does not depend on beta or gamma, so it ranks trials fairly; the SimPO loss and
    reward margins do not. On the bundled task, `eval/success_rate` checks greedy answers.
    """
    policy.eval()
    shard = eval_ds.select(range(rank, len(eval_ds), world))
    window = MetricWindow()
    for start in range(0, len(shard), cfg.per_device_eval_batch_size):
        rows = [shard[i] for i in range(start, min(start + cfg.per_device_eval_batch_size, len(shard)))]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(rows).items()}
        with _autocast(cfg, device):
            out = bare(**_pair_fields(batch))  # no DDP wrapper: shards differ in size
        _, metrics = simpo_objective_for(out, objective)
        window.add(metrics, tokens=_tokens(batch))
    result = {f"eval/{k}": v for k, v in window.reduce(world).items() if k != "tokens"}
    result["eval/sft_loss"] = result.get("eval/sft_loss", float("nan"))
    if is_bundled_task(cfg) and cfg.generation_eval_samples > 0:
        from simpo_ray.bundled.evaluate import success_rate

        n = min(cfg.generation_eval_samples, len(eval_ds))
        prompts = [eval_ds[i]["prompt"] for i in range(rank, n, world)]
        rate = success_rate(bare.model, tokenizer, prompts) if prompts else 0.0
        counts = torch.tensor([rate * len(prompts), float(len(prompts))], dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(counts)
        result["eval/success_rate"] = counts[0].item() / max(counts[1].item(), 1.0)
    policy.train()
    return result


def _report(report, bare, optimizer, scheduler, state, tokenizer, rank, *, with_checkpoint: bool) -> None:
    """ray.train.report on every rank (it is a barrier); rank 0 attaches the checkpoint."""
    if not (with_checkpoint and rank == 0):
        ray.train.report(report)
        return
    with tempfile.TemporaryDirectory() as tmp:
        bare.model.save_pretrained(Path(tmp) / "model")
        tokenizer.save_pretrained(Path(tmp) / "model")
        torch.save({"model": bare.model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "counters": dict(state)}, Path(tmp) / STATE_FILE)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _report_diverged(state, window, startup_s, rank) -> None:
    report = {name: 0.0 for name in BOUNDED_EVAL_METRICS}
    report.update({"step": state["step"], "samples": state["samples"], "tokens": state["tokens"],
                   "train_time_s": state["train_time_s"], "startup_s": startup_s,
                   "diverged": 1, "status": "diverged"})
    ray.train.report(report)
    if rank == 0:
        print(f"[simpo-ray] diverged at step {state['step']}: the loss or gradient norm became "
              "non-finite, or the loss exploded (above divergence_factor x its early level, or "
              "divergence_loss_threshold); stopping this run", flush=True)


def _progress_line(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']}/{r['total_steps']}", f"loss {r.get('loss', float('nan')):.4f}",
             f"eval/loss {r.get('eval/loss', float('nan')):.4f}",
             f"eval/pref_acc {r.get('eval/preference_accuracy', float('nan')):.3f}",
             f"margin {r.get('eval/rewards/margins', float('nan')):.3f}"]
    if "eval/success_rate" in r:
        parts.append(f"success {r['eval/success_rate']:.3f}")
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:.0f} tok/s")
    return "[simpo-ray] " + "  ".join(parts)


if __name__ == "__main__":  # `python -m simpo_ray.train`: the command line is in cli.py
    from simpo_ray.cli import train_main
    sys.exit(train_main())
