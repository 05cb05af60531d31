"""Launch one SimPO training run on Ray Train: the driver side of `python -m simpo_ray.train`
and of every Tune trial.

`make_trainer` is the one builder of a run's `TorchTrainer`; `check_inputs` / `prepare_run`
resolve the model and tokenise the data once in the driver; `run_training` runs one
standalone training and records every report in `history.jsonl`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simpo_ray.infra.cluster import ClusterInfo, check_fits
from simpo_ray.infra.history import HISTORY_FILE, history_callback, read_history
from simpo_ray.config import LIGER_NEEDS_GPU, Resources, TrainConfig, check_packages
from simpo_ray.errors import ConfigError, UserError
from simpo_ray.train.memory import decide_strategy


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
    Returns `tokens.PreparedData`.
    """
    import datasets

    from simpo_ray.data.prepare import prepare_datasets
    from simpo_ray.train.model import load_tokenizer
    from simpo_ray.train.reward import BUNDLED_REWARDS, resolve_reward_path

    check_packages(cfg)  # bitsandbytes, Liger: what this run needs installed
    # No progress bars: they would land on stderr before a one-line error (the CLI contract).
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        if cfg.reward_model_name_or_path in BUNDLED_REWARDS:
            # Built here, once, not by the workers: transformers' save_pretrained writes nothing
            # on a rank other than 0 of a process group, and the first worker to build would
            # leave a cache entry without weights.
            resolve_reward_path(cfg.reward_model_name_or_path)
        return prepare_datasets(cfg, load_tokenizer(cfg))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


OUTPUT_CONFIG = "train_config.yaml"  # the config that claimed an output_dir (a loadable config)


def claim_output_dir(cfg: TrainConfig) -> None:
    """Claim ``output_dir`` for this run before anything runs, or refuse it in one line: a
    directory that holds anything but an earlier run of this same config (its
    `OUTPUT_CONFIG`) is refused unless ``overwrite_output_dir`` (HF's key), so two runs never
    overwrite each other's model in silence. The claim is this config, written there; created
    exclusively, so of two runs starting at once into an empty directory the second is told."""
    if not cfg.output_dir:
        return
    out = Path(cfg.output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: '{cfg.output_dir}' is a file; give a directory")
    mine = cfg.replace(output_dir=str(out), overwrite_output_dir=False).to_yaml()
    marker = out / OUTPUT_CONFIG
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        try:
            with open(marker, "x") as f:
                f.write(mine)
            return
        except FileExistsError:  # another run claimed it since: judged below
            pass
    if cfg.overwrite_output_dir:
        marker.write_text(mine)
        return
    theirs = marker.read_text() if marker.is_file() else None
    if theirs != mine:
        what = ("holds the model of a run of another config" if theirs is not None
                else "is not empty and holds no simpo-ray run's output")
        raise UserError(f"output_dir: '{cfg.output_dir}' {what}; choose another output_dir, empty it, or set "
                        "overwrite_output_dir: true to write over it")


def prepare_run(cfg: TrainConfig, prepared=None) -> PreparedRun:
    """Share the tokenised data (`prepared`, the `check_inputs` result, made here if None)
    through the object store, so N workers and M trials reuse one tokenisation."""
    from simpo_ray.data.shared import share_prepared

    if prepared is None:
        prepared = check_inputs(cfg)
    return PreparedRun(data=share_prepared(prepared, cfg.generation_eval_samples), num_train=prepared.num_train, num_eval=prepared.num_eval)


def run_resources(cfg: TrainConfig, num_workers: int | None = None, cpus_per_worker: float = 1,
                  gpus_per_worker: float | None = None) -> Resources:
    """One run's resources: the given values, else the config's `num_workers`, and 1 GPU per
    worker when the config asks for a GPU (or `use_gpu` is unset and CUDA is here)."""
    if gpus_per_worker is None:
        import torch

        gpus_per_worker = 1 if (cfg.use_gpu or (cfg.use_gpu is None and torch.cuda.is_available())) else 0
    if cfg.use_liger_kernel and not gpus_per_worker:
        raise ConfigError(LIGER_NEEDS_GPU)
    return Resources(num_workers=num_workers or cfg.num_workers, cpus_per_worker=cpus_per_worker,
                     gpus_per_worker=gpus_per_worker)


def make_trainer(cfg: TrainConfig, data: dict[str, Any], resources: Resources, *,
                 storage_path: str | None = None, name: str | None = None, max_failures: int = 0,
                 callbacks: list | None = None, checkpoint_score_attribute: str | None = None,
                 checkpoint_score_order: str = "max", train_loop: Callable[[dict], None] | None = None,
                 strategy: str | None = None, resume_from: str | None = None):
    """The `TorchTrainer` of one SimPO run (DDP over `resources.num_workers`).

    `data`: `PreparedRun.data`. A worker that dies is restarted up to `max_failures` times from
    the latest checkpoint. `cfg.save_total_limit` checkpoints are kept: the most recent, or the
    best by `checkpoint_score_attribute` (a reported metric; Train also keeps the latest).
    `train_loop`: the worker function, `train.train_loop_per_worker` unless a test passes a stub.
    `strategy`: ddp|fsdp as the memory plan chose (None: `memory.decide_strategy` here; the
    workers decide only `auto` on GPUs of undeclared memory, by the same rule). `resume_from`: a checkpoint directory to start from (any worker
    count) when the run has no checkpoint of its own. A relative `output_dir` is the caller's.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if train_loop is None:
        from simpo_ray.train.loop import train_loop_per_worker as train_loop
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config(cfg, data, resources, strategy, resume_from),
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker=resources.worker_bundle),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks or [],
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.save_total_limit,
                                               checkpoint_score_attribute=checkpoint_score_attribute,
                                               checkpoint_score_order=checkpoint_score_order),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )


def loop_config(cfg: TrainConfig, data: dict[str, Any], resources: Resources, strategy: str | None = None,
                resume_from: str | None = None) -> dict[str, Any]:
    """The config `train.loop.train_loop_per_worker` takes (see there)."""
    return {
        "train": cfg.replace(output_dir=os.path.abspath(cfg.output_dir)).to_dict() if cfg.output_dir
        else cfg.to_dict(),
        "data": data, "threads": max(1, int(resources.cpus_per_worker)),
        "strategy": strategy or decide_strategy(cfg, resources),
        "resume_from": os.path.abspath(resume_from) if resume_from else None,
    }


def run_in_process(cfg: TrainConfig, data: dict[str, Any], resources: Resources, local_run, *,
                   train_loop: Callable[[dict], None] | None = None, strategy: str | None = None) -> None:
    """One single-worker run in this process (what Ray Train's local mode is; Ray refuses its
    worker APIs inside a Tune trial, so the loop runs with `worker.InProcessWorker`).

    `local_run` (`local_run.LocalRun`) persists each report and checkpoint as Train would; the
    run resumes from its latest checkpoint, so restarting it is calling this again.
    """
    if resources.num_workers != 1:
        raise ValueError(f"a run in this process has one worker, not {resources.num_workers}")
    if train_loop is None:
        from simpo_ray.train.loop import train_loop_per_worker as train_loop
    import gc

    gc.collect()  # a reused trial process: the previous trial's model and optimizer go first
    config = loop_config(cfg, data, resources, strategy)
    config["report"], config["staging"] = local_run.report, local_run.staging
    latest = local_run.latest_checkpoint()
    if latest:
        config.update(resume_from=latest, restart=True)
    train_loop(config)


def final_metrics(result) -> dict[str, Any]:
    """The metrics of the last report of a run made by `run_training` (without the history's
    `checkpoint_path` note: `result.checkpoint` says where the checkpoint is).

    Train V2's `Result.metrics` is the last *checkpointed* report, so a run that ended with a
    report without checkpoint (a divergence) would show older metrics, or none.
    """
    rows = read_history(Path(result.path) / HISTORY_FILE)
    if not rows:
        return dict(result.metrics or {})
    return {k: v for k, v in rows[-1].items() if k != "checkpoint_path"}


def run_training(cfg: TrainConfig, *, num_workers: int | None = None, cpus_per_worker: float = 1,
                 gpus_per_worker: float | None = None, storage_path: str | None = None,
                 name: str | None = None, max_failures: int = 0, prepared=None,
                 checkpoint_score_attribute: str | None = None, checkpoint_score_order: str = "max",
                 resume_from: str | None = None):
    """Run one SimPO training on the current Ray cluster; returns Ray Train's `Result`.

    `prepared`: the `check_inputs` result when the caller already has it. Every report is also
    appended to `<storage_path>/<name>/history.jsonl` (the learning curve).
    """
    resources = run_resources(cfg, num_workers, cpus_per_worker, gpus_per_worker)
    check_fits(ClusterInfo.from_ray(), resources)
    claim_output_dir(cfg)  # the CLI claimed it before Ray started; the same config again passes
    run = prepare_run(cfg, prepared)
    print(f"[simpo-ray] {run.num_train} training pairs, {run.num_eval} held-out pairs; "
          f"{resources.num_workers} worker(s) x {resources.cpus_per_worker} CPU, "
          f"{resources.gpus_per_worker} GPU", flush=True)
    storage_path = os.path.abspath(storage_path or os.path.join(os.getcwd(), "results"))
    name = name or time.strftime("simpo-train-%Y%m%d-%H%M%S")
    trainer = make_trainer(cfg, run.data, resources, storage_path=storage_path, name=name,
                           max_failures=max_failures,
                           callbacks=[history_callback(Path(storage_path) / name / HISTORY_FILE)],
                           checkpoint_score_attribute=checkpoint_score_attribute,
                           checkpoint_score_order=checkpoint_score_order, resume_from=resume_from)
    return _fit_interruptibly(trainer)


def _fit_interruptibly(trainer):
    """`trainer.fit()` in a thread, the main thread waiting on it, so that Ctrl-C and SIGTERM
    raise KeyboardInterrupt here at once (the run's actors end with the driver: Ray ends a gone
    driver's actors, and a private cluster shuts down at exit).

    In the main thread Train V2's `fit()` installs its own SIGINT handler, which aborts the run
    and then exits with status 1 and no message (and is never removed); from another thread it
    installs none. Errors of the run are raised here as `fit()` raises them.
    """
    import threading

    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="simpo-ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
