"""One SimPO training run on Ray Train: the per-worker loop and `python -m simpo_ray.train`.

The loop is what every Ray Train worker runs (DDP over the workers: gloo on CPU, nccl on GPU).
It knows nothing about Ray Tune: it reports metrics with `ray.train.report` every
`eval_steps`, and whoever launched the run (this module's CLI, or a Tune trial) forwards them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from simpo_ray.config import TrainConfig, from_dict, load_train_config
from simpo_ray.errors import UserError

# Metrics whose worst value is known a priori (they are shares in [0, 1], higher is better).
# A diverged run reports them as 0.0 so that a searcher ranks it last.
BOUNDED_EVAL_METRICS = ("eval/preference_accuracy", "eval/rewards/accuracies", "eval/success_rate")
STATE_FILE = "trainer_state.pt"


def quiet_ray_train_logs() -> None:
    """Keep Ray Train's per-report INFO lines (a full metrics dict per report) out of the console."""
    import logging

    import ray.train.v2._internal.execution.context as train_context

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)  # that module logs by file name
    import transformers

    transformers.utils.logging.disable_progress_bar()  # weight loading/saving bars on every checkpoint


def ray_env_defaults() -> None:
    """Environment for the Ray processes this driver starts (set before `ray.init`).

    Train V2's print patch routes worker prints through a logger that echoes them again, so
    every progress line appeared twice.
    """
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def is_bundled_task(cfg: TrainConfig) -> bool:
    return all(name.startswith("bundled:") for name in cfg.dataset_mixer)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point.

    `config` holds `train` (a TrainConfig dict), `data` (the tokenised train/eval datasets,
    as object-store references or cache paths, prepared once by the driver) and `threads`.
    """
    t_start = time.perf_counter()  # start-up includes the imports below
    cfg = from_dict(config["train"])
    quiet_ray_train_logs()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    from simpo_ray.data import PairCollator
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
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            saved = torch.load(Path(ckpt_dir) / STATE_FILE, map_location=device, weights_only=False)
        bare.model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state.update(saved["counters"])
        # A restart after a worker failure (Ray Train's FailureConfig): training continues from
        # the checkpoint's step; reports carry how often this run was restarted.
        state["restarts"] = state.get("restarts", 0) + 1
        if rank == 0:
            print(f"[simpo-ray] resumed from checkpoint at step {state['step']} "
                  f"(restart {state['restarts']})", flush=True)

    objective = dict(beta=cfg.beta, gamma_beta_ratio=cfg.gamma_beta_ratio, loss_type=cfg.loss_type,
                     label_smoothing=cfg.label_smoothing, sft_weight=cfg.sft_weight)
    save_every = cfg.save_steps or cfg.eval_steps
    window = MetricWindow()
    startup_s = time.perf_counter() - t_start
    window_start = time.perf_counter()
    micro = 0
    early_losses: list[float] = []  # the first steps' losses: the scale an explosion is judged against
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
            with policy.no_sync() if (not sync and hasattr(policy, "no_sync")) else _null():
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
            loss_value = metrics["loss"].detach()
            healthy = torch.isfinite(loss_value) & torch.isfinite(grad_norm)
            if cfg.divergence_loss_threshold is not None:
                healthy &= loss_value <= cfg.divergence_loss_threshold
            if len(early_losses) < 10:
                early_losses.append(float(loss_value))
            elif cfg.divergence_factor is not None:
                reference = max(sum(early_losses) / 10, 1.0)
                healthy &= loss_value <= cfg.divergence_factor * reference
            if not _all_ranks(healthy):
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


def _autocast(cfg: TrainConfig, device):
    """bf16 compute over fp32 master weights when `bf16: true` (the reference trainer's mixed precision)."""
    if not cfg.bf16:
        return _null()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


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


# --- the driver side: prepare data once, launch a TorchTrainer -------------------------------

@dataclass
class PreparedRun:
    """What the driver hands to the workers: tokenised data prepared once, in the object store."""

    data: dict[str, Any]
    num_train: int
    num_eval: int


def check_inputs(cfg: TrainConfig):
    """Resolve the model (building a bundled one once) and tokenise the data (cached on disk).

    Needs no Ray, so the CLIs call it before `ray.init`: a missing model path, a dataset with
    missing columns or no rows, ... is one `UserError` line before any Ray process starts.
    Returns `data.PreparedData`.
    """
    import datasets

    from simpo_ray.data import prepare_datasets
    from simpo_ray.model import load_tokenizer

    # No progress bars: they would land on stderr before a one-line error (the CLI contract).
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        tokenizer = load_tokenizer(cfg)
        return prepare_datasets(cfg, tokenizer)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def prepare_run(cfg: TrainConfig, prepared=None) -> PreparedRun:
    """Resolve the model, tokenise the data once (`check_inputs`), share it via the object store.

    Runs in the driver, before any worker starts, so N workers and M trials reuse one
    tokenisation (cached on disk by fingerprint) and one SFT model build.
    """
    from simpo_ray.shared_data import share_prepared

    if prepared is None:
        prepared = check_inputs(cfg)
    return PreparedRun(data=share_prepared(prepared), num_train=prepared.num_train, num_eval=prepared.num_eval)


def default_gpus_per_worker(cfg: TrainConfig, gpus_per_worker: float | None) -> float:
    """The flag if given; else 1 when the config asks for a GPU (or `use_gpu` is unset and CUDA is here)."""
    if gpus_per_worker is not None:
        return gpus_per_worker
    return 1 if (cfg.use_gpu or (cfg.use_gpu is None and torch.cuda.is_available())) else 0


def check_fits(cluster, num_workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """`UserError` when the run's workers can never be placed on `cluster` (a `tune_runtime.ClusterInfo`).

    Ray Train retries an unplaceable worker group forever, so without this a run that asks
    for a GPU on a CPU-only cluster would hang instead of failing.
    """
    from simpo_ray.tune_runtime import TrialResources, plan_concurrency

    plan_concurrency(cluster, TrialResources(num_workers, cpus_per_worker, gpus_per_worker))


def local_cluster():
    """This machine's CPUs and GPUs as a `ClusterInfo`: what a local `ray.init()` would get."""
    from simpo_ray.tune_runtime import ClusterInfo

    node = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    return ClusterInfo(total=node, nodes=(node,))


def check_writable(root: str) -> None:
    """`UserError` unless `root` (a local directory; created if missing) is writable."""
    if "://" in root:
        return
    try:
        os.makedirs(root, exist_ok=True)
        probe = Path(root) / f".simpo-ray-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--storage-path: {root} is not writable ({e.strerror or e})") from None


def worker_config(cfg: TrainConfig, prepared: PreparedRun, threads: int) -> dict[str, Any]:
    return {"train": cfg.to_dict(), "data": prepared.data, "threads": threads}


def history_callback(path: str | os.PathLike):
    """A Ray Train callback that appends every report (rank 0's metrics) to a JSON-lines file.

    Train's own `Result.metrics_dataframe` keeps only reports that carried a checkpoint; this
    keeps the whole learning curve. It runs in the Train controller, on the driver's machine.
    """
    from ray.train import UserCallback

    class MetricsHistory(UserCallback):
        def __init__(self, target: str) -> None:
            self.target = target

        def after_report(self, run_context, metrics, checkpoint) -> None:
            Path(self.target).parent.mkdir(parents=True, exist_ok=True)
            with open(self.target, "a") as f:
                f.write(json.dumps(metrics[0], default=float) + "\n")

    return MetricsHistory(os.fspath(path))


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The reports in a history.jsonl; a last line cut short by a crash mid-append is skipped."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return rows


def final_metrics(result) -> dict[str, Any]:
    """The last report of a run made by `run_training`.

    Train V2's `Result.metrics` is the last *checkpointed* report, so a run that ended with a
    report without checkpoint (a divergence) would show older metrics, or none.
    """
    history = Path(result.path) / "history.jsonl"
    rows = read_history(history) if history.exists() else []
    return rows[-1] if rows else dict(result.metrics or {})


def make_trainer(cfg: TrainConfig, prepared: PreparedRun, *, num_workers: int, cpus_per_worker: float = 1,
                 gpus_per_worker: float = 0, storage_path: str | None = None, name: str | None = None,
                 max_failures: int = 0, callbacks: list | None = None,
                 checkpoint_score_attribute: str | None = None, checkpoint_score_order: str = "max"):
    """A `TorchTrainer` for one SimPO run (DDP over `num_workers`).

    A worker that dies is restarted up to `max_failures` times from the latest checkpoint.
    `cfg.save_total_limit` checkpoints are kept: the most recent ones, or the best by
    `checkpoint_score_attribute` (e.g. the search objective) when given.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(cfg, prepared, threads=max(1, int(cpus_per_worker))),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks or [],
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.save_total_limit,
                                               checkpoint_score_attribute=checkpoint_score_attribute,
                                               checkpoint_score_order=checkpoint_score_order),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )


def run_training(cfg: TrainConfig, *, num_workers: int | None = None, cpus_per_worker: float = 1,
                 gpus_per_worker: float | None = None, storage_path: str | None = None,
                 name: str | None = None, max_failures: int = 0, prepared=None,
                 checkpoint_score_attribute: str | None = None, checkpoint_score_order: str = "max"):
    """Run one SimPO training on the current Ray cluster; returns Ray Train's `Result`.

    `prepared`: the `check_inputs` result when the caller already has it. Checkpoints kept:
    the `save_total_limit` most recent, or with `checkpoint_score_attribute` (a reported metric)
    the best ones by it (Ray Train also keeps the latest, which a restart resumes from).

    Every report is also appended to `<storage_path>/<name>/history.jsonl` (the learning curve).
    """
    from simpo_ray.tune_runtime import ClusterInfo

    num_workers = num_workers or cfg.num_workers
    gpus_per_worker = default_gpus_per_worker(cfg, gpus_per_worker)
    check_fits(ClusterInfo.from_ray(), num_workers, cpus_per_worker, gpus_per_worker)
    prepared = prepare_run(cfg, prepared)
    print(f"[simpo-ray] {prepared.num_train} training pairs, {prepared.num_eval} held-out pairs; "
          f"{num_workers} worker(s) x {cpus_per_worker} CPU, {gpus_per_worker} GPU", flush=True)
    storage_path = os.path.abspath(storage_path or os.path.join(os.getcwd(), "results"))
    name = name or time.strftime("simpo-train-%Y%m%d-%H%M%S")
    history = Path(storage_path) / name / "history.jsonl"
    trainer = make_trainer(cfg, prepared, num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                           gpus_per_worker=gpus_per_worker, storage_path=storage_path, name=name,
                           max_failures=max_failures, callbacks=[history_callback(history)],
                           checkpoint_score_attribute=checkpoint_score_attribute,
                           checkpoint_score_order=checkpoint_score_order)
    return _fit_restoring_sigint(trainer)


def _fit_restoring_sigint(trainer):
    """`trainer.fit()`, then put back the caller's SIGINT handler.

    In the main thread, Train V2's fit() installs a SIGINT handler (Ctrl-C aborts the run
    gracefully) whose closure holds the controller actor's handle and is never removed: the
    TrainController process (~400 MB) then outlives the run until the next fit() or the end
    of the process, and Ctrl-C keeps going to a finished run. Restoring the handler releases both.
    """
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        return trainer.fit()
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGINT, previous)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineArgumentParser(
        prog="python -m simpo_ray.train",
        description="Run one SimPO training on Ray Train from a YAML config in the SimPO reference "
                    "trainer's key names (model_name_or_path, dataset_mixer, learning_rate, beta, "
                    "gamma_beta_ratio, sft_weight, ...).",
    )
    p.add_argument("--config", required=True, help="training config YAML")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (DDP); default: the config's num_workers")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (default: 1 if CUDA is available)")
    p.add_argument("--storage-path", default=None, help="where Ray Train keeps checkpoints (default ./results)")
    p.add_argument("--name", default=None, help="run name under the storage path")
    p.add_argument("--metrics-out", default=None, help="write the final metrics as JSON to this file")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("--max-failures", type=int, default=0, help="worker failures to recover from via checkpoints")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        cfg = load_train_config(args.config)
        for flag, low in (("num_workers", 1), ("max_failures", 0)):
            value = getattr(args, flag)
            if value is not None and value < low:
                raise UserError(f"--{flag.replace('_', '-')}: {value} is out of range; allowed >= {low}")
        for flag in ("cpus_per_worker", "gpus_per_worker"):
            value = getattr(args, flag)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise UserError(f"--{flag.replace('_', '-')}: {value} is out of range; allowed >= 0")
        num_workers = args.num_workers or cfg.num_workers
        gpus = default_gpus_per_worker(cfg, args.gpus_per_worker)
        storage_path = os.path.abspath(os.path.expanduser(args.storage_path or os.path.join(os.getcwd(), "results")))
        # Everything checkable without Ray is checked before Ray starts: no Ray log line and no
        # Ray process for a mistake in the input.
        check_writable(storage_path)
        address = args.address or os.environ.get("RAY_ADDRESS")
        if not address:
            check_fits(local_cluster(), num_workers, args.cpus_per_worker, gpus)
        prepared = check_inputs(cfg)
        ray_env_defaults()
        ray.init(address=address or "local", include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
        try:
            result = run_training(cfg, num_workers=num_workers, cpus_per_worker=args.cpus_per_worker,
                                  gpus_per_worker=gpus, storage_path=storage_path,
                                  name=args.name, max_failures=args.max_failures, prepared=prepared)
            error = result.error
        except (ray.exceptions.RayError, ray.train.TrainingFailedError) as e:
            # Train V2's fit() raises when the workers fail more often than --max-failures allows.
            error = e
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if error is not None:
        if args.debug:
            raise error
        print(f"error: training failed: {_one_line(error)}", file=sys.stderr)
        return 1
    metrics = final_metrics(result)
    metrics["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    if args.metrics_out:
        from simpo_ray.io import write_json_atomic

        write_json_atomic(args.metrics_out, metrics)
    print(json.dumps({k: metrics[k] for k in sorted(metrics) if k.startswith(("eval/", "step", "status"))}, indent=1))
    return 0 if metrics.get("status") != "diverged" else 3


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
