"""The hyperparameter search: `python -m simpo_ray.tune --space search_spaces/7b.yaml`.

A search is declared, not programmed: a space (YAML → `SearchSpace`), Optuna's seeded TPE
proposing the four SimPO hyperparameters inside the guide's documented ranges, an
early-stopping scheduler (ASHA by default) acting on the per-step metrics each trial reports,
and a `Tuner`. Each trial is a Ray Train `TorchTrainer` run of the SimPO loop
(`simpo_ray.train`), launched from a Tune function trainable. This module never touches tensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from simpo_ray.errors import UserError

OBJECTIVE_WORST = {"max": 0.0}  # the bundled objectives are shares in [0, 1]



def load(space_path: str | os.PathLike, *, task=None, model_type=None, allow_out_of_range=False,
         num_samples=None, seed=None, scheduler=None, sampler=None, max_concurrent=None, overrides=None):
    """The validated space with command-line values applied on top of the YAML's."""
    from simpo_ray.space import load_space

    flat = dict(overrides or {})
    for key, value in (("num_samples", num_samples), ("seed", seed), ("scheduler", scheduler),
                       ("sampler", sampler), ("max_concurrent", max_concurrent)):
        if value is not None:
            flat[f"search.{key}"] = value
    return load_space(space_path, task=task, model_type=model_type,
                      allow_out_of_range=allow_out_of_range, overrides=flat or None)


def dry_run(space_path, *, address=None, storage_path=None, name=None, **kwargs) -> str:
    """Validate the space against the cluster and describe the plan; starts no trial.

    Without --address it inspects this machine (no Ray started), so a laptop can check a
    70B space before booking the cluster it needs.
    """
    from simpo_ray.space import estimate_gpu_hours
    from simpo_ray.tune_runtime import TrialResources, plan_concurrency

    space = load(space_path, **kwargs)
    resources = TrialResources(space.resources.num_workers, space.resources.cpus_per_worker,
                               space.resources.gpus_per_worker)
    cluster, where = _cluster_for_plan(address)
    lines = [space.describe(), ""]
    for note in space.notes:
        lines.append(f"note: {note}")
    lines.append(f"cluster ({where}): {cluster.cpus:g} CPU, {cluster.gpus:g} GPU on {len(cluster.nodes)} node(s)")
    try:
        slots = plan_concurrency(cluster, resources, space.search.max_concurrent)
        lines.append(f"concurrency: {slots} trial(s) at once; {space.search.num_samples} trials in "
                     f"about {-(-space.search.num_samples // slots)} wave(s) before early stopping")
    except UserError as e:
        lines.append(f"does not fit this cluster: {e}")
    est = estimate_gpu_hours(space)
    if space.resources.gpus_per_worker > 0:
        lines.append(
            f"estimate: {est['steps_per_trial']} steps and {est['tokens_per_trial']:.3g} tokens per trial; "
            f"{est['gpu_hours_per_trial']:.3g} GPU-hours per trial ({est['wall_hours_per_trial']:.3g} h on "
            f"{est['gpus_per_trial']} GPUs); search: at most {est['gpu_hours_upper_bound']:.3g} GPU-hours, "
            f"about {est['gpu_hours_asha_estimate']:.3g} with {space.search.scheduler}")
        lines.append(f"  assumptions: {est['assumptions']}")
    else:
        lines.append(f"estimate: {est['steps_per_trial']} steps per trial on CPU (no GPU-hours)")
    lines.append(f"results would go to {_experiment_path(storage_path, name or space.name)}")
    return "\n".join(lines)


def _cluster_for_plan(address: str | None):
    """The cluster a search would run on: the one at `address`, else this machine (no Ray started)."""
    from simpo_ray.tune_runtime import ClusterInfo, init_ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return init_ray(address, reap_orphans=False), f"Ray cluster at {address}"
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        pass
    node = {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}
    return ClusterInfo(total=node, nodes=(node,)), "this machine; pass --address to check a cluster"


def _storage_root(storage_path: str | None) -> str:
    if storage_path is None:
        return os.path.abspath("results")
    if "://" in storage_path:
        return storage_path
    return os.path.abspath(os.path.expanduser(storage_path))


def _experiment_path(storage_path: str | None, name: str) -> str:
    return f"{_storage_root(storage_path).rstrip('/')}/{name}"


def run_search(space_path, *, storage_path=None, name=None, num_samples=None, seed=None, scheduler=None,
               sampler=None, max_concurrent=None, address=None, resume=False, task=None, model_type=None,
               overrides=None, allow_out_of_range=False, verbose: int = 1) -> Path:
    """Run (or resume) a search; returns the experiment directory with the results tables."""
    from ray import tune

    from simpo_ray.config import from_dict
    from simpo_ray.train import prepare_run
    from simpo_ray.tune_runtime import TrialResources, init_ray, plan_concurrency

    space = load(space_path, task=task, model_type=model_type, allow_out_of_range=allow_out_of_range,
                 num_samples=num_samples, seed=seed, scheduler=scheduler, sampler=sampler,
                 max_concurrent=max_concurrent, overrides=overrides)
    name = name or space.name
    root = _storage_root(storage_path)
    exp_path = _experiment_path(storage_path, name)
    _check_storage(root, exp_path, resume=resume)
    resources = TrialResources(space.resources.num_workers, space.resources.cpus_per_worker,
                               space.resources.gpus_per_worker)
    from simpo_ray.train import ray_env_defaults

    ray_env_defaults()
    # Tune's legacy reporter prints one compact table of the key metrics; the new output engine
    # prints every reported metric of every trial (dozens of lines per report).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    cluster = init_ray(address or os.environ.get("RAY_ADDRESS"), log_to_driver=False,
                       configure_logging=False)
    slots = plan_concurrency(cluster, resources, space.search.max_concurrent)
    default_point = space.points_to_evaluate[0] if space.points_to_evaluate else None
    base_cfg = from_dict(space.trial_config(default_point or {}))
    _say(verbose, f"[simpo-ray] search '{name}': {space.search.num_samples} trials, {slots} at a time, "
                  f"objective {space.search.objective} ({space.search.mode}), scheduler {space.search.scheduler}")
    _say(verbose, "[simpo-ray] preparing data and model once for all trials ...")
    t0 = time.perf_counter()
    prepared = prepare_run(base_cfg)
    _say(verbose, f"[simpo-ray] {prepared.num_train} training pairs, {prepared.num_eval} held-out pairs "
                  f"ready in {time.perf_counter() - t0:.1f}s")
    trainable = _trainable(space, prepared, resources, exp_path)
    info = _search_info(space, space_path, name)
    if resume:
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=False,
                                   restart_errored=False, resume_unfinished=True)
    else:
        _write_search_info(exp_path, info)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=space.search.objective, mode=space.search.mode,
                search_alg=_searcher(space), scheduler=_scheduler(space),
                num_samples=space.search.num_samples, max_concurrent_trials=slots,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=root, stop=DivergenceStopper(),
                progress_reporter=_reporter(space), verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    grid = tuner.fit()
    return finish(grid, space, exp_path, info, verbose=verbose)


def _trainable(space, prepared, resources, exp_path: str):
    """The Tune function trainable: one TorchTrainer run of the SimPO loop per trial.

    The trial driver requests no CPU or GPU (only a token of logical memory, since a placement
    group bundle may not be empty): Train V2 reserves the workers' resources in its own placement
    group, and a 1-CPU driver per trial is what starved the workers and deadlocked the search
    (docs/ray-runtime-notes.md). The tokenised data reaches trials through `tune.with_parameters`
    (the object store), never through the trial config, so nothing large is saved with the
    experiment state and a resumed search re-shares it.
    """
    from ray import tune

    from simpo_ray.tune_runtime import DRIVER_MEMORY_BYTES

    train_storage = f"{exp_path}/train_runs"
    keep = space.search.checkpoint_keep
    max_failures = space.search.max_failures
    # Retention: the `checkpoint_keep` best checkpoints by the search objective, plus the latest
    # (Ray Train never deletes the latest: a restarted worker resumes from it).
    score, order = space.search.objective, space.search.mode

    def simpo_trial(params: dict, data=None) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from simpo_ray.config import from_dict
        from simpo_ray.train import PreparedRun, make_trainer
        from simpo_ray.tune_runtime import TRAIN_ENV_DEFAULTS

        for key, value in TRAIN_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        cfg = from_dict({**space.trial_config(params), "save_total_limit": keep})
        trainer = make_trainer(
            cfg, PreparedRun(data=data, num_train=0, num_eval=0), num_workers=resources.num_workers,
            cpus_per_worker=resources.cpus_per_worker, gpus_per_worker=resources.gpus_per_worker,
            storage_path=train_storage, name=f"train-{tune.get_context().get_trial_id()}",
            max_failures=max_failures, callbacks=[TuneReportCallback()],
            checkpoint_score_attribute=score, checkpoint_score_order=order,
        )
        trainer.fit()

    trainable = tune.with_parameters(simpo_trial, data=prepared.data)
    return tune.with_resources(trainable, tune.PlacementGroupFactory([{"CPU": 0, "memory": DRIVER_MEMORY_BYTES}]))


def _say(verbose: int, text: str) -> None:
    if verbose:
        print(text, flush=True)


def _check_storage(root: str, exp_path: str, *, resume: bool) -> None:
    """Refuse an unwritable storage path, a resume without a search, or a silent overwrite."""
    from ray import tune

    from simpo_ray.train import check_writable

    check_writable(root)
    exists = tune.Tuner.can_restore(exp_path)
    if resume and not exists:
        raise UserError(f"--resume: {exp_path} holds no search to resume (check --storage-path and --name)")
    if not resume and exists:
        raise UserError(f"a search already exists at {exp_path}; pass --resume to continue it, "
                        "or --name to start a new one")


def _search_info(space, space_path, name: str) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("simpo-ray")
    except PackageNotFoundError:
        ours = "unknown"
    return {
        "name": name, "space_file": str(space_path), "size_bucket": space.size_bucket,
        "task": space.task, "model_type": space.model_type, "objective": space.search.objective,
        "mode": space.search.mode, "seed": space.search.seed, "scheduler": space.search.scheduler,
        "sampler": space.search.sampler,
        "num_samples": space.search.num_samples, "model_name_or_path": space.base.get("model_name_or_path"),
        "params": {n: p.to_dict() for n, p in space.params.items()},
        "points_to_evaluate": space.points_to_evaluate, "point_labels": space.point_labels,
        "guide": space.guide_summary(), "space": space.to_dict(), "simpo_ray_version": ours,
        "search": dataclasses.asdict(space.search),
    }


def _write_search_info(exp_path: str, info: dict[str, Any]) -> None:
    from simpo_ray.io import write_json_atomic

    if "://" in exp_path:
        _write_remote(f"{exp_path}/search.json", json.dumps(info, indent=2, default=str))
    else:
        write_json_atomic(Path(exp_path) / "search.json", info)


def _write_remote(uri: str, text: str) -> None:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_output_stream(path) as f:  # object stores replace an object atomically
        f.write(text.encode())


def _searcher(space):
    """Optuna over the searched parameters, seeded: TPE (constant_liar keeps parallel trials apart)
    or, with `search.sampler: random`, Optuna's RandomSampler (the baseline TPE is measured against).
    Both evaluate the same `points_to_evaluate` first."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    dists = {}
    for name, p in space.params.items():
        if p.distribution == "choice":
            dists[name] = optuna.distributions.CategoricalDistribution(list(p.values))
        else:
            dists[name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.distribution == "loguniform")
    if space.search.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=space.search.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=space.search.seed, constant_liar=True,
                                             n_startup_trials=max(len(space.points_to_evaluate) + 2, 4))
    return OptunaSearch(space=dists, metric=space.search.objective, mode=space.search.mode,
                        points_to_evaluate=[{k: v for k, v in pt.items() if k in dists}
                                            for pt in space.points_to_evaluate] or None,
                        sampler=sampler)


def _scheduler(space):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    s = space.search
    if s.scheduler == "asha":
        return ASHAScheduler(time_attr=s.time_attr, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, max_t=s.max_t)
    if s.scheduler == "hyperband":
        return HyperBandScheduler(time_attr=s.time_attr, max_t=s.max_t, reduction_factor=s.reduction_factor)
    if s.scheduler == "median":
        return MedianStoppingRule(time_attr=s.time_attr, grace_period=s.grace_period, min_samples_required=3)
    return FIFOScheduler()


def _stopper_base():
    from ray.tune import Stopper

    return Stopper


class DivergenceStopper(_stopper_base()):
    """Stops a trial that reports divergence (non-finite or exploding loss).

    The training loop itself ends a diverged run and reports the objective's worst value, so
    that the searcher learns to avoid the region; this stopper makes sure Tune never schedules
    more work for such a trial.
    """

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return result.get("diverged") == 1

    def stop_all(self) -> bool:
        return False


def _reporter(space):
    from ray.tune import CLIReporter

    metrics = {"step": "step", space.search.objective: space.search.objective.split("/")[-1],
               "eval/preference_accuracy": "pref_acc", "loss": "loss"}
    # (not our "status" metric: for a trial ASHA stopped it still says "running", its value at
    # the last report, beside Tune's own TERMINATED)
    return CLIReporter(
        metric_columns=metrics,
        parameter_columns={"learning_rate": "lr", "beta": "beta", "gamma_beta_ratio": "g/b", "sft_weight": "sft"},
        max_report_frequency=30, sort_by_metric=True, max_progress_rows=12,
    )


def finish(grid, space, exp_path: str, info: dict[str, Any], *, verbose: int = 1) -> Path:
    """Write trials.csv, curves.csv and best_config.yaml; print the summary."""
    from simpo_ray.config import from_dict
    from simpo_ray.io import write_text_atomic
    from simpo_ray.results import best_trial, build_tables, summary_table, write_tables

    default_point = space.points_to_evaluate[0] if space.points_to_evaluate else None
    trials, curves = build_tables(list(grid), objective=space.search.objective, mode=space.search.mode,
                                  default_point=default_point, info=info)
    local = Path(exp_path) if "://" not in exp_path else Path("results") / info["name"]
    write_tables(local, trials, curves)
    best = best_trial(trials, space.search.mode)
    lines = [f"\n[simpo-ray] search '{info['name']}' finished: "
             + ", ".join(f"{(trials['status'] == s).sum()} {s}" for s in ("completed", "stopped_early", "diverged", "errored"))]
    if best is not None:
        params = {k: float(best[k]) for k in space.params}
        cfg = from_dict(space.trial_config(params))
        ckpt = best.get("best_checkpoint") or ""
        header = (f"# Best configuration of search '{info['name']}' ({space.search.objective} = "
                  f"{best['best_objective']:.4f}, trial {best['trial_id']}, step {best['best_step']:.0f}).\n"
                  + (f"# Its checkpoint at that step: {ckpt}\n" if ckpt else "")
                  + f"# Run it: python -m simpo_ray.train --config {local / 'best_config.yaml'}\n")
        write_text_atomic(local / "best_config.yaml", header + cfg.to_yaml())
        lines.append(summary_table(trials, space.search.mode))
        default = trials[trials["is_default"]]
        if len(default) and default.iloc[0]["status"] != "errored":
            d = default.iloc[0]
            lines.append(f"documented default: {space.search.objective} = {d['best_objective']:.4f} "
                         f"({d['status']}); best: {best['best_objective']:.4f} "
                         f"({best['best_objective'] - d['best_objective']:+.4f})")
        lines.append(f"best config: {local / 'best_config.yaml'}")
        if ckpt:
            lines.append(f"best checkpoint: {ckpt} (step {best['best_step']:.0f})")
    else:
        lines.append("no trial finished; see the error column of trials.csv")
    lines.append(f"results: {local / 'trials.csv'} (one row per trial), {local / 'curves.csv'} (learning curves)")
    if "://" in exp_path:
        for fname in ("trials.csv", "curves.csv", "best_config.yaml"):
            if (local / fname).exists():
                _write_remote(f"{exp_path}/{fname}", (local / fname).read_text())
    _say(verbose, "\n".join(lines))
    return local


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    from simpo_ray.train import OneLineArgumentParser  # usage errors: one `error:` line, exit 2

    p = OneLineArgumentParser(
        prog="python -m simpo_ray.tune",
        description=(
            "Search SimPO hyperparameters (learning_rate, beta, gamma_beta_ratio, sft_weight) "
            "within the documented ranges for a model size, on a Ray cluster: Optuna TPE proposes, "
            "ASHA stops weak trials early, each trial trains with Ray Train."
        ),
        epilog=(
            "examples:\n"
            "  python -m simpo_ray.tune --space search_spaces/cpu-tiny.yaml      # bundled CPU task\n"
            "  python -m simpo_ray.tune --space search_spaces/7b.yaml --dry-run  # plan only\n"
            "  python -m simpo_ray.tune --space search_spaces/7b.yaml --address auto --storage-path s3://bucket/simpo\n"
            "  python -m simpo_ray.tune --space search_spaces/cpu-tiny.yaml --resume   # continue an interrupted search\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--space", required=True, help="search space YAML (see search_spaces/)")
    p.add_argument("--storage-path", default=None,
                   help="where results and checkpoints go: a local dir (default ./results), NFS, or s3://...")
    p.add_argument("--name", default=None, help="experiment name (default: the space's name)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto' or host:port; default RAY_ADDRESS, else start a local one)")
    p.add_argument("--num-samples", type=int, default=None, help="number of trials (default: the space's)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: as many as the cluster fits)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: the space's)")
    p.add_argument("--scheduler", default=None, choices=["asha", "hyperband", "median", "fifo"],
                   help="early stopping (default: the space's; fifo = none)")
    p.add_argument("--sampler", default=None, choices=["tpe", "random"],
                   help="how trials are proposed (default: the space's; random = Optuna RandomSampler)")
    p.add_argument("--task", default=None, choices=["chat", "code", "math", "creative"],
                   help="task preset: narrows/shifts ranges as the guide's tables do")
    p.add_argument("--model-type", default=None, choices=["base", "instruct", "chat"],
                   help="model-type preset (sft_weight range)")
    p.add_argument("--allow-out-of-range", action="store_true",
                   help="search ranges outside the guide's documented ranges")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted search at --storage-path/--name (finished trials are kept)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the space against the cluster and print the plan; start no trial")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.dry_run and args.resume:
            raise UserError("--dry-run and --resume conflict: a dry run starts nothing to resume")
        for flag in ("num_samples", "max_concurrent"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise UserError(f"--{flag.replace('_', '-')}: {value} is out of range; allowed >= 1")
        kwargs = dict(storage_path=args.storage_path, name=args.name, num_samples=args.num_samples,
                      seed=args.seed, scheduler=args.scheduler, sampler=args.sampler,
                      max_concurrent=args.max_concurrent, address=args.address, task=args.task, model_type=args.model_type,
                      allow_out_of_range=args.allow_out_of_range)
        if args.dry_run:
            print(dry_run(args.space, **kwargs))
            return 0
        # Check what needs no Ray before Ray starts (run_search starts it before it prepares the
        # data and plans the trials): a bad model path, bad data or a trial that cannot fit is
        # one error line, with no Ray process started and no Ray log line printed.
        from simpo_ray.config import from_dict
        from simpo_ray.train import check_fits, check_inputs, check_writable, local_cluster

        space = load(args.space, task=args.task, model_type=args.model_type,
                     allow_out_of_range=args.allow_out_of_range, num_samples=args.num_samples,
                     seed=args.seed, scheduler=args.scheduler, sampler=args.sampler,
                     max_concurrent=args.max_concurrent)
        check_writable(_storage_root(args.storage_path))
        if not (args.address or os.environ.get("RAY_ADDRESS")):
            r = space.resources
            check_fits(local_cluster(), r.num_workers, r.cpus_per_worker, r.gpus_per_worker)
        default_point = space.points_to_evaluate[0] if space.points_to_evaluate else {}
        check_inputs(from_dict(space.trial_config(default_point)))
        run_search(args.space, resume=args.resume, **kwargs)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
