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

from simpo_ray import parallel, ray_workarounds
from simpo_ray.config import TrainConfig, from_dict
from simpo_ray.errors import UserError

# Metrics whose worst value is known a priori (they are shares in [0, 1], higher is better).
# A diverged run reports them as 0.0 so that a searcher ranks it last.
BOUNDED_EVAL_METRICS = ("eval/preference_accuracy", "eval/rewards/accuracies", "eval/success_rate",
                        "eval/reward_win_rate", "eval/reward_win_rate_lc")


def is_bundled_task(cfg: TrainConfig) -> bool:
    return all(name.startswith("bundled:") for name in cfg.dataset_mixer)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point.

    `config` holds `train` (a TrainConfig dict), `data` (the tokenised train/eval datasets,
    as object-store references or cache paths, prepared once by the driver), `threads`,
    `strategy` (ddp|fsdp, or None: decided here) and `resume_from` (a checkpoint directory to
    start from when Ray Train has none of its own, e.g. on a different number of workers).
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

    from simpo_ray.model import load_tokenizer
    from simpo_ray.shared_data import load_shared
    from simpo_ray.tokens import PairCollator

    tokenizer = load_tokenizer(cfg)
    strategy = config.get("strategy") or _strategy(cfg, device, world)
    policy, bare = parallel.build_policy(cfg, strategy, device, rank, world)
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

    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(loader) // cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_train_epochs)
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer,
                              num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)

    state = {"step": 0, "samples": 0, "tokens": 0, "epoch": 0, "batch_in_epoch": 0, "train_time_s": 0.0,
             "restarts": 0}
    if rank == 0:
        print(_setup_line(cfg, strategy, world, device), flush=True)
    _resume(ray.train.get_checkpoint(), config.get("resume_from"), bare.model, optimizer, scheduler, state, rank)

    objective = dict(beta=cfg.beta, gamma_beta_ratio=cfg.gamma_beta_ratio, loss_type=cfg.loss_type,
                     label_smoothing=cfg.label_smoothing, sft_weight=cfg.sft_weight)
    from simpo_ray.shared_data import load_prompts

    ev = Evaluator(policy, bare, tokenizer, eval_ds, collator, cfg, objective, device, rank, world, strategy,
                   load_prompts(config["data"]), state)
    save_every = cfg.save_steps or cfg.eval_steps
    window, log = MetricWindow(), MetricWindow()
    startup_s = time.perf_counter() - t_start
    window_start = log_start = time.perf_counter()
    micro = 0
    divergence = DivergenceCheck(cfg)
    done = state["step"] >= total_steps
    if state["step"] == 0:
        # The starting point (the SFT model), so every curve and every "did it improve" has a baseline.
        report = {**ev(), "step": 0, "epoch": 0.0, "samples": 0, "tokens": 0,
                  "learning_rate": scheduler.get_last_lr()[0], "train_time_s": 0.0,
                  "startup_s": startup_s, "total_steps": total_steps, "diverged": 0, "status": "running"}
        ray.train.report(report)
        if rank == 0:
            print(_progress_line(report), flush=True)
        window_start = log_start = time.perf_counter()

    while not done:
        sampler.set_epoch(state["epoch"])
        for batch_index, batch in enumerate(loader):
            if batch_index < state["batch_in_epoch"]:  # replay the epoch's order up to a resume point
                continue
            t0 = time.perf_counter()
            sync = (micro + 1) % cfg.gradient_accumulation_steps == 0
            with _gradient_sync(policy, strategy, sync):
                with _autocast(cfg, device, strategy):
                    out = policy(**_pair_fields(batch))
                loss, metrics = simpo_objective_for(out, objective)
                (loss / cfg.gradient_accumulation_steps).backward()
            window.add(metrics, tokens=_tokens(batch))
            log.add(metrics, tokens=_tokens(batch))
            micro += 1
            state["batch_in_epoch"] = batch_index + 1
            state["samples"] += batch["chosen_input_ids"].shape[0] * world
            if not sync:
                state["train_time_s"] += time.perf_counter() - t0
                continue
            grad_norm = parallel.clip_grad_norm(policy, cfg.max_grad_norm)
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
                sizes = parallel.local_bytes(policy, optimizer)
                report = {
                    **train_metrics, **ev(state["step"], done),
                    "step": state["step"], "epoch": state["epoch"] + state["batch_in_epoch"] / len(loader),
                    "samples": state["samples"], "tokens": state["tokens"],
                    "learning_rate": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens_in_window / max(window_s, 1e-9),
                    "train_time_s": state["train_time_s"], "startup_s": startup_s,
                    "total_steps": total_steps, "diverged": 0, "restarts": state["restarts"],
                    "memory/param_bytes": sizes["param_bytes"], "memory/optimizer_bytes": sizes["optimizer_bytes"],
                    "status": "completed" if done else "running",
                }
                ckpt = state["step"] % save_every == 0 or done
                _report(report, bare.model, optimizer, scheduler, state, cfg, rank, with_checkpoint=ckpt)
                if rank == 0:
                    print(_progress_line(report), flush=True)
                window, log = MetricWindow(), MetricWindow()
                window_start = log_start = time.perf_counter()
            elif state["step"] % cfg.logging_steps == 0 and rank == 0:
                print(_log_line(state["step"], total_steps, log.reduce(1), scheduler.get_last_lr()[0],
                                time.perf_counter() - log_start), flush=True)
                log, log_start = MetricWindow(), time.perf_counter()
            if done:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    if cfg.output_dir:
        _save_final_model(bare.model, tokenizer, cfg.output_dir, rank)


def _strategy(cfg: TrainConfig, device: torch.device, world: int) -> str:
    """`cfg.parallel`, with `auto` decided by the memory plan against this worker's GPU (DDP on CPU)."""
    if cfg.parallel != "auto":
        return cfg.parallel
    if device.type != "cuda":
        return "ddp"
    from transformers import AutoConfig

    from simpo_ray.memory import Batch, ModelShape, choose, reward_params
    from simpo_ray.model import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(cfg.model_name_or_path),
                                        trust_remote_code=cfg.trust_remote_code)
    shape = ModelShape.from_config(config, cfg.model_name_or_path)
    gb = torch.cuda.get_device_properties(device).total_memory / 1e9
    plan = choose(shape, Batch(cfg.per_device_train_batch_size, cfg.max_length, cfg.bf16,
                               cfg.gradient_checkpointing), parallel="auto", world=world, gpu_memory_gb=gb,
                  cpu_offload=cfg.fsdp_cpu_offload, reward_params=reward_params(cfg))
    fsdp = torch.tensor([1.0 if plan.strategy == "fsdp" else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(fsdp, op=dist.ReduceOp.MAX)  # every worker must agree
    return "fsdp" if fsdp.item() > 0 else "ddp"


def _setup_line(cfg: TrainConfig, strategy: str, world: int, device: torch.device) -> str:
    precision = "bf16 compute over fp32 master weights" if cfg.bf16 else "fp32"
    how = f"{strategy} over {world} worker(s)" + (", CPU offload" if strategy == "fsdp" and cfg.fsdp_cpu_offload else "")
    return (f"[simpo-ray] {how} on {device.type}; precision {precision}; gradient checkpointing "
            f"{'on' if cfg.gradient_checkpointing else 'off'}; dropout {'off' if cfg.disable_dropout else 'on'}")


def _resume(checkpoint, resume_from: str | None, model, optimizer, scheduler, state: dict, rank: int) -> None:
    """Continue from Ray Train's latest checkpoint of this run (a restart after a worker failure),
    else from `resume_from`: model, optimizer, scheduler, counters and RNG state. Reports then
    carry how often this run was restarted."""
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state.update(parallel.load_checkpoint(Path(ckpt_dir), model, optimizer, scheduler, rank))
        state["restarts"] = state.get("restarts", 0) + 1
        what = f"restart {state['restarts']}"
    elif resume_from:
        state.update(parallel.load_checkpoint(Path(resume_from), model, optimizer, scheduler, rank))
        what = f"from {resume_from}"
    else:
        return
    if rank == 0:
        print(f"[simpo-ray] resumed from checkpoint at step {state['step']} ({what})", flush=True)


def _save_final_model(model, tokenizer, output_dir: str, rank: int) -> None:
    """The trained model as a plain Hugging Face directory (the full state dict gathered once)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(output_dir, state_dict=full)
        tokenizer.save_pretrained(output_dir)
        print(f"[simpo-ray] final model saved to {output_dir}", flush=True)
    if dist.is_initialized():
        dist.barrier()


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


def _autocast(cfg: TrainConfig, device, strategy: str = "ddp"):
    """bf16 compute over fp32 master weights when `bf16: true` (the reference trainer's mixed
    precision); under FSDP its MixedPrecisionPolicy casts the gathered parameters instead."""
    if not cfg.bf16 or strategy == "fsdp":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _gradient_sync(policy, strategy: str, sync: bool):
    """No gradient all-reduce (DDP) / reduce-scatter (FSDP) on accumulation micro-batches."""
    if strategy == "fsdp":
        policy.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return policy.no_sync() if (not sync and hasattr(policy, "no_sync")) else contextlib.nullcontext()


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


class Evaluator:
    """Held-out metrics, sharded across workers and all-reduced, and generation quality.

    `eval/preference_accuracy` (share of pairs whose average log-prob of chosen exceeds
    rejected) does not depend on beta or gamma, so it ranks trials fairly, but it cannot see
    what the model generates; `quality.GenerationEval` adds `eval/success_rate` (bundled task)
    and the reward model's win rates. Under FSDP every forward is collective, so every worker
    runs the same number of batches (a worker with fewer rows repeats one and discards it) and
    generation runs with synced_gpus.
    """

    def __init__(self, policy, bare, tokenizer, eval_ds, collator, cfg: TrainConfig, objective, device,
                 rank: int, world: int, strategy: str, prompts: list[dict], state: dict) -> None:
        from simpo_ray.quality import GenerationEval
        from simpo_ray.tokens import inserts_system_turn

        self.policy, self.bare, self.tokenizer, self.ds, self.collator = policy, bare, tokenizer, eval_ds, collator
        self.cfg, self.objective, self.device, self.rank, self.world = cfg, objective, device, rank, world
        self.lockstep = strategy == "fsdp" and world > 1
        system = cfg.auto_insert_empty_system_msg and inserts_system_turn(tokenizer)
        self.generation = GenerationEval(prompts[:cfg.generation_eval_samples], tokenizer, cfg, device, rank, world,
                                         bundled=is_bundled_task(cfg), system_turn=system,
                                         lockstep=self.lockstep, state=state)
        self.last_generation: dict[str, float] = {}

    @torch.no_grad()
    def __call__(self, step: int = 0, final: bool = False) -> dict[str, float]:
        cfg, ds = self.cfg, self.ds
        t0 = time.perf_counter()
        self.policy.eval()
        rows = list(range(self.rank, len(ds), self.world))
        size = cfg.per_device_eval_batch_size
        n_batches = math.ceil(math.ceil(len(ds) / self.world) / size) if self.lockstep else math.ceil(len(rows) / size)
        window = MetricWindow()
        for b in range(n_batches):
            chunk = rows[b * size:(b + 1) * size]
            batch = self.collator([ds[i] for i in (chunk or [0])])
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with _autocast(cfg, self.device, "fsdp" if self.lockstep else "ddp"):
                # DDP: the bare module (shards differ in size); FSDP: the sharded root.
                out = self.bare(**_pair_fields(batch))
            if chunk:
                _, metrics = simpo_objective_for(out, self.objective)
                window.add(metrics, tokens=_tokens(batch))
        result = {f"eval/{k}": v for k, v in window.reduce(self.world).items() if k != "tokens"}
        result["eval/sft_loss"] = result.get("eval/sft_loss", float("nan"))
        if self.generation.active:
            every = cfg.generation_eval_steps or cfg.eval_steps
            if step % every == 0 or final or not self.last_generation:
                fresh = self.generation(self.bare if self.lockstep else self.bare.model)
                result.update(fresh)  # with its time/ entries, which are not carried forward
                self.last_generation = {k: v for k, v in fresh.items() if k.startswith("eval/")}
                self.last_generation["eval/generation_step"] = step
            result.update(self.last_generation)
        result["time/eval_s"] = time.perf_counter() - t0
        self.policy.train()
        return result


def _report(report, model, optimizer, scheduler, state, cfg: TrainConfig, rank: int, *, with_checkpoint: bool) -> None:
    """ray.train.report on every rank (it is a barrier); with a checkpoint, every rank writes its
    shards into its own directory and reports it: Ray Train gathers them into one checkpoint."""
    if not with_checkpoint:
        ray.train.report(report)
        return
    with tempfile.TemporaryDirectory() as tmp:
        parallel.save_checkpoint(Path(tmp), model, optimizer, scheduler, dict(state), cfg, rank)
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


def _num(r: dict[str, Any], key: str, fmt: str) -> str:
    """A metric formatted, or an em dash where there is none yet (step 0 has no training loss)."""
    value = r.get(key)
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _progress_line(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']}/{r['total_steps']}", f"loss {_num(r, 'loss', '.4f')}",
             f"eval/loss {_num(r, 'eval/loss', '.4f')}",
             f"eval/pref_acc {_num(r, 'eval/preference_accuracy', '.3f')}",
             f"margin {_num(r, 'eval/rewards/margins', '.3f')}"]
    if "eval/success_rate" in r:
        parts.append(f"success {r['eval/success_rate']:.3f}")
    if "eval/reward_win_rate" in r:
        parts.append(f"win {r['eval/reward_win_rate']:.3f} (LC {r['eval/reward_win_rate_lc']:.3f}, "
                     f"{r['eval/gen_length']:.0f} tok)")
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:.0f} tok/s")
    return "[simpo-ray] " + "  ".join(parts)


def _log_line(step: int, total: int, m: dict[str, float], lr: float, seconds: float) -> str:
    """Every `logging_steps`: the training loss since the last line (rank 0's batches)."""
    return (f"[simpo-ray] step {step}/{total}  loss {_num(m, 'loss', '.4f')}  "
            f"reward margin {_num(m, 'rewards/margins', '.3f')}  lr {lr:.3g}  "
            f"{m.get('tokens', 0.0) / max(seconds, 1e-9):.0f} tok/s")


if __name__ == "__main__":  # `python -m simpo_ray.train`: the command line is in cli.py
    from simpo_ray.cli import train_main
    sys.exit(train_main())
