"""The SimPO loop that every Ray Train worker runs (DDP: gloo on CPU, nccl on GPU).

It trains, evaluates every `eval_steps`, checkpoints its state, stops on divergence, and
reports metrics through its worker (`train.worker`: `ray.train.report`, or a sink in the caller's
process); it knows nothing about Tune (whoever launched the run, `simpo_ray.infra.launch`,
forwards the reports). `python -m simpo_ray.train` is `simpo_ray.cli`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from simpo_ray.train import checkpoints, memory, parallel
from simpo_ray.infra import ray_workarounds
from simpo_ray.config import Resources, TrainConfig, from_dict
from simpo_ray.errors import UserError
from simpo_ray.train.evaluate import BOUNDED_EVAL_METRICS, Evaluator, log_line, progress_line, setup_line
from simpo_ray.train.worker import InProcessWorker, RayTrainWorker
from simpo_ray.train.step import DivergenceCheck, MetricWindow, all_ranks, batch_tokens, forward_backward, zero_grad


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point.

    `config` holds `train` (a TrainConfig dict), `data` (the tokenised train/eval datasets,
    as object-store references or cache paths, prepared once by the driver), `threads`,
    `strategy` (ddp|fsdp, or None: decided here) and `resume_from` (a checkpoint directory to
    start from when Ray Train has none of its own, e.g. on a different number of workers).
    In the caller's process (one worker, `worker.InProcessWorker`, `infra.local_run`) `report` is
    the callable that persists each report (metrics, checkpoint directory or None) in place of
    `ray.train.report`, `staging` (optional) gives the directory a checkpoint is written into, and
    `restart` says that `resume_from` is this run's own latest checkpoint.
    """
    t_start = time.perf_counter()  # start-up includes the imports below
    cfg = from_dict(config["train"])
    ray_workarounds.quiet_train_logs()
    import transformers

    transformers.utils.logging.disable_progress_bar()  # weight loading/saving bars on every checkpoint
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    worker = (InProcessWorker(config["report"], config.get("staging")) if config.get("report")
              else RayTrainWorker())
    rank, world, device = worker.rank, worker.world, worker.device
    torch.manual_seed(cfg.seed)

    from simpo_ray.train.model import load_tokenizer
    from simpo_ray.data.shared import load_shared
    from simpo_ray.data.collate import PairCollator

    tokenizer = load_tokenizer(cfg)
    send = worker.report
    saved = _saved_counters(worker.checkpoint(), config.get("resume_from"))
    cfg, kept_steps, recipe_note = checkpoints.keep_recipe(saved, cfg, world)
    strategy = config.get("strategy") or _strategy(cfg, device, world)
    policy, bare = parallel.build_policy(cfg, strategy, device, rank, world, prepare=worker.prepare_model)
    train_ds = load_shared(config["data"]["train"])
    eval_ds = load_shared(config["data"]["eval"])
    collator = PairCollator(tokenizer.pad_token_id)

    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_ds, batch_size=cfg.per_device_train_batch_size, sampler=sampler,
                        collate_fn=collator, drop_last=True)
    loader = worker.prepare_loader(loader)
    if len(loader) < cfg.gradient_accumulation_steps:
        raise UserError(
            f"the training split has {len(train_ds)} pairs: too few for one optimizer step of "
            f"{cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps} x {world} workers"
        )

    from simpo_ray.train.optim import build_optimizer, warmup_steps

    optimizer = build_optimizer(cfg, policy.parameters())
    steps_per_epoch = len(loader) // cfg.gradient_accumulation_steps
    total_steps = kept_steps or (cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.num_train_epochs))
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                              num_training_steps=total_steps)

    state = {"step": 0, "samples": 0, "tokens": 0, "epoch": 0, "batch_in_epoch": 0, "train_time_s": 0.0,
             "restarts": 0}
    if rank == 0:
        print(setup_line(cfg, strategy, world, device), flush=True)
    _resume(worker.checkpoint(), config.get("resume_from"), bare.model, optimizer, scheduler, state, rank,
            restart=bool(config.get("restart")))
    state["batch_in_epoch"] = checkpoints.batches_done_here(state, cfg, world)
    state["recipe"] = checkpoints.recipe(cfg, world, total_steps)
    if recipe_note and rank == 0:
        print(f"[simpo-ray] {recipe_note}", flush=True)

    objective = dict(beta=cfg.beta, gamma_beta_ratio=cfg.gamma_beta_ratio, loss_type=cfg.loss_type,
                     label_smoothing=cfg.label_smoothing, sft_weight=cfg.sft_weight)
    from simpo_ray.data.shared import load_prompts

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
        send(report)
        if rank == 0:
            print(progress_line(report), flush=True)
        window_start = log_start = time.perf_counter()

    while not done:
        sampler.set_epoch(state["epoch"])
        for batch_index, batch in enumerate(loader):
            if batch_index < state["batch_in_epoch"]:  # replay the epoch's order up to a resume point
                continue
            t0 = time.perf_counter()
            sync = (micro + 1) % cfg.gradient_accumulation_steps == 0
            loss, metrics = forward_backward(policy, batch, cfg, objective, device, strategy, sync)
            window.add(metrics, tokens=batch_tokens(batch))
            log.add(metrics, tokens=batch_tokens(batch))
            micro += 1
            state["batch_in_epoch"] = batch_index + 1
            state["samples"] += batch["chosen_input_ids"].shape[0] * world
            if not sync:
                state["train_time_s"] += time.perf_counter() - t0
                continue
            grad_norm = parallel.clip_grad_norm(policy, cfg.max_grad_norm)
            if not all_ranks(divergence.healthy(metrics["loss"].detach(), grad_norm)):
                state["step"] += 1
                _report_diverged(send, state, window, startup_s, rank)
                return
            optimizer.step()
            scheduler.step()
            zero_grad(optimizer, strategy)
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
                _report(worker, report, bare.model, optimizer, scheduler, state, cfg, rank, with_checkpoint=ckpt)
                if rank == 0:
                    print(progress_line(report), flush=True)
                window, log = MetricWindow(), MetricWindow()
                window_start = log_start = time.perf_counter()
            elif state["step"] % cfg.logging_steps == 0 and rank == 0:
                print(log_line(state["step"], total_steps, log.reduce(1), scheduler.get_last_lr()[0],
                                time.perf_counter() - log_start), flush=True)
                log, log_start = MetricWindow(), time.perf_counter()
            if done:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    if cfg.output_dir:
        _save_final_model(bare.model, tokenizer, cfg, rank)


def _strategy(cfg: TrainConfig, device: torch.device, world: int) -> str:
    """The driver's decision reached the worker as None only for `auto` on GPUs of unknown
    memory: the same rule (`memory.decide_strategy`) with this device's memory, agreed by all."""
    if device.type != "cuda":
        return memory.decide_strategy(cfg, Resources(num_workers=world))
    gb = torch.cuda.get_device_properties(device).total_memory / 1e9
    resources = Resources(num_workers=world, gpus_per_worker=1, gpu_memory_gb=gb)
    chosen = memory.decide_strategy(cfg, resources, shape=memory.shape_for(cfg, local_files_only=False))
    fsdp = torch.tensor([1.0 if chosen == "fsdp" else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(fsdp, op=dist.ReduceOp.MAX)  # every worker must agree
    return "fsdp" if fsdp.item() > 0 else "ddp"


def _saved_counters(checkpoint, resume_from: str | None) -> dict | None:
    """The counters of the checkpoint this run will resume from (as `_resume` picks it), if any.
    Ray's checkpoint is read through its own filesystem, the small JSON file alone: `as_directory`
    would download a remote checkpoint whole, and `_resume` downloads it once already."""
    if checkpoint:
        try:
            with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{checkpoints.STATE_FILE}") as f:
                return checkpoints.parse_counters(f.read().decode())
        except (OSError, UnicodeDecodeError):
            return None
    return checkpoints.saved_counters(Path(resume_from)) if resume_from else None


def _resume(checkpoint, resume_from: str | None, model, optimizer, scheduler, state: dict, rank: int, *,
            restart: bool = False) -> None:
    """Continue from Ray Train's latest checkpoint of this run (a restart after a worker failure),
    else from `resume_from` (`restart`: the run's own latest checkpoint, in local mode): model,
    optimizer, scheduler, counters and RNG state. Reports then carry how often this run was restarted."""
    if checkpoint or (restart and resume_from):
        if checkpoint:
            with checkpoint.as_directory() as ckpt_dir:
                state.update(checkpoints.load_checkpoint(Path(ckpt_dir), model, optimizer, scheduler, rank))
        else:
            state.update(checkpoints.load_checkpoint(Path(resume_from), model, optimizer, scheduler, rank))
        state["restarts"] = state.get("restarts", 0) + 1
        what = f"restart {state['restarts']}"
    elif resume_from:
        state.update(checkpoints.load_checkpoint(Path(resume_from), model, optimizer, scheduler, rank))
        what = f"from {resume_from}"
    else:
        return
    if rank == 0:
        print(f"[simpo-ray] resumed from checkpoint at step {state['step']} ({what})", flush=True)


def _save_final_model(model, tokenizer, cfg: TrainConfig, rank: int) -> None:
    """The trained model as a plain Hugging Face directory in `output_dir` (the full state dict
    gathered once), in the exported models' dtype (`model.export_dtype`: `torch_dtype`, else bf16
    under bf16, else fp32)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from simpo_ray.train.model import export_dtype

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        dtype = export_dtype(cfg)
        model.save_pretrained(cfg.output_dir, state_dict={k: v.to(dtype) for k, v in full.items()})
        model.config.dtype = dtype  # save_pretrained wrote the training weights' fp32 into config.json
        model.config.save_pretrained(cfg.output_dir)
        tokenizer.save_pretrained(cfg.output_dir)
        print(f"[simpo-ray] final model saved to {cfg.output_dir}", flush=True)
    if dist.is_initialized():
        dist.barrier()


def _report(worker, report, model, optimizer, scheduler, state, cfg: TrainConfig, rank: int, *,
            with_checkpoint: bool) -> None:
    """The worker's report on every rank (Ray Train's is a barrier); with a checkpoint, every rank
    writes its shards into its own directory and reports it: Ray Train gathers them into one
    checkpoint (an in-process run's sink takes its staging directory over by a rename)."""
    if not with_checkpoint:
        worker.report(report)
        return
    with worker.checkpoint_dir() as tmp:
        checkpoints.save_checkpoint(Path(tmp), model, optimizer, scheduler, dict(state), cfg, rank)
        worker.report(report, tmp)


def _report_diverged(send, state, window, startup_s, rank) -> None:
    report = {name: 0.0 for name in BOUNDED_EVAL_METRICS}
    report.update({"step": state["step"], "samples": state["samples"], "tokens": state["tokens"],
                   "train_time_s": state["train_time_s"], "startup_s": startup_s,
                   "diverged": 1, "status": "diverged"})
    send(report)
    if rank == 0:
        print(f"[simpo-ray] diverged at step {state['step']}: the loss or gradient norm became "
              "non-finite, or the loss exploded (above divergence_factor x its early level, or "
              "divergence_loss_threshold); stopping this run", flush=True)


