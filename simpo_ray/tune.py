"""The hyperparameter search: a space, Optuna proposing trials, an early-stopping scheduler, a `Tuner`.

Each trial is one SimPO training run built by `simpo_ray.launch.make_trainer`, started from a
Tune function trainable; `run_search` runs (or resumes) a whole search and `dry_run` describes
its plan. The command line (`python -m simpo_ray.tune`) is in `simpo_ray.cli`. No tensors here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune import Stopper
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from simpo_ray import cluster, ray_workarounds
from simpo_ray.errors import UserError
from simpo_ray.lock import ExperimentLock
from simpo_ray.objectives import describe as describe_objective
from simpo_ray.records import BUDGET_KEYS, SearchRecord, space_differences
from simpo_ray.results import TRIAL_HISTORY, finish
from simpo_ray.space import SearchSpace, load_space


def load(space_path: str | os.PathLike, *, task=None, model_type=None, allow_out_of_range=False,
         num_samples=None, seed=None, scheduler=None, sampler=None, max_concurrent=None, overrides=None,
         warm_start=None, warm_start_narrow=None):
    """The validated space with command-line values applied on top of the YAML's (`warm_start`:
    finished-search directories added after the space's `search.warm_start`)."""
    flat = dict(overrides or {})
    for key, value in (("num_samples", num_samples), ("seed", seed), ("scheduler", scheduler),
                       ("sampler", sampler), ("max_concurrent", max_concurrent),
                       ("warm_start_narrow", warm_start_narrow)):
        if value is not None:
            flat[f"search.{key}"] = value
    return load_space(space_path, task=task, model_type=model_type, allow_out_of_range=allow_out_of_range,
                      overrides=flat or None, warm_start=tuple(warm_start or ()))


def _loaded(space: SearchSpace | str | os.PathLike, load_options: dict[str, Any]) -> SearchSpace:
    """`space` itself when already loaded (then `load_options` must be unset), else `load(space, ...)`."""
    if not isinstance(space, SearchSpace):
        return load(space, **load_options)
    given = sorted(k for k, v in load_options.items() if v not in (None, False))
    if given:
        raise TypeError(f"{', '.join(given)}: pass these to tune.load(), not with a loaded SearchSpace")
    return space


def dry_run(space: SearchSpace | str | os.PathLike, *, address=None, storage_path=None, name=None,
            **load_options) -> str:
    """Validate the space against the cluster and describe the plan; starts no trial.

    Without an address (or RAY_ADDRESS) it inspects this machine (no Ray started), so a laptop
    can check a 70B space before booking the cluster it needs.
    """
    from simpo_ray.describe import describe_space
    from simpo_ray.estimate import estimate_gpu_hours

    space = _loaded(space, load_options)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        target, where = cluster.init_ray(address, reap_orphans=False), f"Ray cluster at {address}"
    else:
        target, where = cluster.ClusterInfo.local(), "this machine; pass --address to check a cluster"
    lines = [describe_space(space), ""]
    for note in space.notes:
        lines.append(f"note: {note}")
    if space.warm is not None:  # transfer.describe: trials handed over, trends, the predicted point
        lines += space.warm.lines
    lines.append(f"cluster ({where}): {target.cpus:g} CPU, {target.gpus:g} GPU on {len(target.nodes)} node(s)")
    try:
        slots = cluster.plan_concurrency(target, space.resources, space.search.max_concurrent)
        lines.append(f"concurrency: {slots} trial(s) at once; {space.search.num_samples} trials in "
                     f"about {-(-space.search.num_samples // slots)} wave(s) before early stopping")
    except UserError as e:
        lines.append(f"does not fit this cluster: {e}")
    try:
        plan = memory_plan(space)
        lines.append(f"memory per GPU: {plan.summary()}; model shape from {plan.shape.source}"
                     if plan else "memory per GPU: not planned (no resources.gpu_memory_gb)")
    except UserError as e:
        lines.append(f"memory: does not fit: {e}")
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
    lines.append(f"results would go to {experiment_path(storage_path, name or space.name)}")
    return "\n".join(lines)


def storage_root(storage_path: str | None) -> str:
    """Where searches are stored: `storage_path` (a local dir, made absolute, or a URI), default ./results."""
    if storage_path is None:
        return os.path.abspath("results")
    if "://" in storage_path:
        return storage_path
    return os.path.abspath(os.path.expanduser(storage_path))


def experiment_path(storage_path: str | None, name: str) -> str:
    return f"{storage_root(storage_path).rstrip('/')}/{name}"


def run_search(space: SearchSpace | str | os.PathLike, *, storage_path=None, name=None, address=None,
               resume=False, prepared=None, verbose: int = 1, num_samples=None, seed=None, scheduler=None,
               sampler=None, max_concurrent=None, task=None, model_type=None, overrides=None,
               allow_out_of_range=False, warm_start=None, warm_start_narrow=None,
               resume_command: str | None = None) -> Path:
    """Run (or resume) a search; returns the experiment directory with the results tables.

    `space`: a loaded `SearchSpace`, or a space file loaded here with the load options
    (`num_samples` ... `warm_start_narrow`, as `load`). A warm-started space (`space.warm`)
    hands its same-size trials to the searcher as completed trials (`_searcher`). `prepared`: the `launch.check_inputs`
    result for the space's default config when the caller already has it. `resume_command`:
    the command line printed to continue the search if it is interrupted (default: one built
    from these arguments).

    The experiment is locked for the whole search (`simpo_ray.lock`): a second search of the
    same storage path and name is refused with one line naming the holder. A `--resume` whose
    space resolves differently from the one recorded in search.json is refused too.
    """
    load_options = dict(task=task, model_type=model_type, allow_out_of_range=allow_out_of_range,
                        num_samples=num_samples, seed=seed, scheduler=scheduler, sampler=sampler,
                        max_concurrent=max_concurrent, overrides=overrides, warm_start=warm_start,
                        warm_start_narrow=warm_start_narrow)
    space = _loaded(space, load_options)
    name = name or space.name
    cluster.check_writable(storage_root(storage_path))
    if resume_command is None:
        resume_command = _resume_command(space.source, storage_path, name, address, load_options)
    if resume:  # checked again under the lock; here so that a mistyped name creates nothing
        _check_resumable(experiment_path(storage_path, name))
    with ExperimentLock(experiment_path(storage_path, name)):
        return _search(space, storage_path=storage_path, name=name, address=address, resume=resume,
                       prepared=prepared, verbose=verbose, resume_command=resume_command)


def _resume_command(space_file: str, storage_path: str | None, name: str, address: str | None,
                    load_options: dict[str, Any]) -> str:
    """`python -m simpo_ray.tune ... --resume` with the options that make the same space."""
    args = ["python", "-m", "simpo_ray.tune", "--space", space_file, "--storage-path",
            storage_root(storage_path), "--name", name]
    if address:
        args += ["--address", address]
    for key, value in load_options.items():
        if key == "overrides" or value in (None, False) or (isinstance(value, (list, tuple)) and not value):
            continue
        flag = f"--{key.replace('_', '-')}"
        args += [flag] + ([] if value is True else [*map(str, value)] if isinstance(value, (list, tuple))
                          else [str(value)])
    text = shlex.join(args + ["--resume"])
    return text + ("  (with the same overrides)" if load_options.get("overrides") else "")


def _search(space: SearchSpace, *, storage_path, name: str, address, resume: bool, prepared, verbose: int,
            resume_command: str) -> Path:
    """`run_search` once the experiment is locked."""
    from ray import tune

    from simpo_ray.launch import prepare_run

    space_file = space.source
    root = storage_root(storage_path)
    exp_path = experiment_path(storage_path, name)
    record = _check_storage(exp_path, resume=resume, record=SearchRecord.from_space(space, space_file, name),
                            verbose=verbose)
    memory_plan(space)  # a trial that cannot fit its GPUs is refused before Ray starts
    # Tune's legacy reporter prints one compact table of the key metrics; the new output engine
    # prints every reported metric of every trial (dozens of lines per report).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    target = cluster.init_ray(address or os.environ.get("RAY_ADDRESS"), log_to_driver=False,
                              configure_logging=False)
    slots = cluster.plan_concurrency(target, space.resources, space.search.max_concurrent)
    _say(verbose, f"[simpo-ray] search '{name}': {space.search.num_samples} trials, {slots} at a time, "
                  f"objective {describe_objective(space.search)}, scheduler {space.search.scheduler}")
    if space.warm is not None and not resume:  # a resumed searcher keeps the trials it was given
        _say(verbose, f"[simpo-ray] {space.warm.summary()}")
    _say(verbose, "[simpo-ray] preparing data and model once for all trials ...")
    t0 = time.perf_counter()
    run = prepare_run(space.default_config(), prepared)
    _say(verbose, f"[simpo-ray] {run.num_train} training pairs, {run.num_eval} held-out pairs "
                  f"ready in {time.perf_counter() - t0:.1f}s")
    trainable = trial_trainable(space, run.data, exp_path)
    record.write(exp_path)  # state: running (a finished or interrupted search says so at the end)
    if resume:
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=False,
                                   restart_errored=False, resume_unfinished=True)
    else:
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
    ray_workarounds.quiet_tune_end_hints()  # our summary words the end (and how to resume)
    grid = tuner.fit()
    return finish(grid, space, exp_path, record, verbose=verbose, resume_command=resume_command)


def memory_plan(space: SearchSpace):
    """The memory plan of one trial of `space` (`memory.plan_for`): None on CPU-only spaces;
    `UserError` (one line, before any Ray process) when no strategy fits `gpu_memory_gb`."""
    from simpo_ray.memory import plan_for

    return plan_for(space.default_config(), space.resources,
                    space.estimate.params_billion if space.estimate else None)


def trial_trainable(space: SearchSpace, data: dict[str, Any], exp_path: str, *,
                    train_loop: Callable[[dict], None] | None = None):
    """The Tune function trainable: one `launch.make_trainer` run per trial, reports forwarded to Tune.

    The trial driver requests no CPU or GPU (only `cluster.DRIVER_MEMORY_BYTES` of logical
    memory): Train reserves the workers' resources in its own placement group, so a driver's CPU
    would only starve them (docs/ray-runtime-notes.md §1). The tokenised data (`data`, object
    store references) reaches trials through `tune.with_parameters`, never through the trial
    config, so nothing large is saved with the experiment state. The Train run is named after
    the trial, so a rerun trial resumes from its latest checkpoint. `train_loop`: tests only.
    """
    from ray import tune

    train_storage = f"{exp_path}/train_runs"
    keep = space.search.checkpoint_keep
    max_failures = space.search.max_failures
    # Retention: the `checkpoint_keep` best checkpoints by the search objective, plus the latest
    # (Ray Train never deletes the latest: a restarted worker resumes from it).
    score, order = space.search.objective, space.search.mode
    plan = memory_plan(space)  # the strategy every trial uses (refused before Ray starts if none fits)
    strategy = plan.strategy if plan else None

    def simpo_trial(params: dict, data=None) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from simpo_ray.launch import make_trainer

        for key, value in cluster.TRAIN_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        trainer = make_trainer(
            space.trial_config(params, save_total_limit=keep, output_dir=None), data, space.resources,
            storage_path=train_storage, name=f"train-{tune.get_context().get_trial_id()}",
            max_failures=max_failures,
            callbacks=[TuneReportCallback(), trial_history_callback(
                f"{exp_path}/" + TRIAL_HISTORY.format(trial_id=tune.get_context().get_trial_id()))],
            checkpoint_score_attribute=score, checkpoint_score_order=order, train_loop=train_loop,
            strategy=strategy,
        )
        trainer.fit()

    trainable = tune.with_parameters(simpo_trial, data=data)
    return tune.with_resources(trainable, tune.PlacementGroupFactory(
        [{"CPU": 0, "memory": cluster.DRIVER_MEMORY_BYTES}]))


def _say(verbose: int, text: str) -> None:
    if verbose:
        print(text, flush=True)


def _check_storage(exp_path: str, *, resume: bool, record: SearchRecord, verbose: int = 1) -> SearchRecord:
    """Refuse a resume without a search, a silent overwrite, or a resume with another space;
    return the record to keep: `record` for a new search, the stored one for a resume."""
    from ray import tune

    if resume:
        _check_resumable(exp_path)
    elif tune.Tuner.can_restore(exp_path):
        raise UserError(f"a search already exists at {exp_path}; pass --resume to continue it, "
                        "or --name to start a new one")
    if not resume:
        return record
    stored = SearchRecord.load(exp_path)
    if not stored.space:
        _say(verbose, "[simpo-ray] note: cannot check that the space is the one this search started with "
                      "(its search.json is of schema version 1, which did not record it)")
    else:
        diffs = space_differences(stored.space, record.space)
        budget = [d for d in diffs if d.split(":")[0] in BUDGET_KEYS]
        other = [d for d in diffs if d not in budget]
        if other:
            more = f" (and {len(other) - 3} more)" if len(other) > 3 else ""
            raise UserError(f"--resume: the space differs from the one search '{stored.name}' started with "
                            f"({stored.space_file}): {'; '.join(other[:3])}{more}; resume with that space "
                            "and the same options, or pass --name to start a new search")
        for d in budget:
            _say(verbose, f"[simpo-ray] note: {d} is not applied: a resumed search keeps the budget it "
                          "started with (Ray Tune restores its searcher and settings as saved)")
    return dataclasses.replace(stored, state="running")


def _check_resumable(exp_path: str) -> None:
    from ray import tune

    if not tune.Tuner.can_restore(exp_path):
        raise UserError(f"--resume: {exp_path} holds no search to resume (check --storage-path and --name)")


def trial_history_callback(path: str):
    """A Ray Train callback appending each report (rank 0's metrics, with `checkpoint_path` when
    the report saved one) to the trial's history.jsonl: local paths and NFS by appending a line,
    pyarrow URIs (`s3://`) by rewriting the object. It runs in the trial's Train controller and
    sees every attempt of the run, which Tune's own result file does not keep across a resume
    (`results._one_row_per_step`)."""
    from ray.train import UserCallback

    class TrialHistory(UserCallback):
        def __init__(self, target: str) -> None:
            self.target = target

        def after_report(self, run_context, metrics, checkpoint) -> None:
            import json

            row = dict(metrics[0])
            if checkpoint is not None:
                row["checkpoint_path"] = checkpoint.path
            line = json.dumps(row, default=float) + "\n"
            if "://" in self.target:
                from simpo_ray.records import read_remote, write_remote

                write_remote(self.target, (read_remote(self.target) or "") + line)
            else:
                Path(self.target).parent.mkdir(parents=True, exist_ok=True)
                with open(self.target, "a") as f:
                    f.write(line)

    return TrialHistory(path)


def _searcher(space):
    """Optuna over the searched parameters, seeded: TPE (constant_liar keeps parallel trials apart)
    or, with `search.sampler: random`, Optuna's RandomSampler (the baseline TPE is measured against).
    Both evaluate the same `points_to_evaluate` first.

    A warm start's same-size trials (`space.warm.trials`) go into the study as COMPLETE trials
    with their values (`OptunaSearch.add_evaluated_point`: `study.add_trial`), after the points
    are enqueued, so they run nothing and the points keep their order (`ask` takes the WAITING
    trials first). Not `evaluated_rewards`: with it OptunaSearch tells EVERY point of
    `points_to_evaluate` as evaluated and enqueues none, the documented default included."""
    import optuna

    dists = {}
    for name, p in space.params.items():
        if p.distribution == "choice":
            dists[name] = optuna.distributions.CategoricalDistribution(list(p.values))
        else:
            dists[name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.distribution == "loguniform")
    s = space.search
    if s.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    else:
        startup = s.tpe_startup_trials if s.tpe_startup_trials is not None else max(len(space.points_to_evaluate) + 2, 4)
        # multivariate None: Optuna's default (5.0: joint for one objective, independent for several)
        sampler = optuna.samplers.TPESampler(seed=s.seed, constant_liar=True, n_startup_trials=startup,
                                             multivariate=s.tpe_multivariate)
    multi = bool(s.objectives)  # Optuna's TPE proposes on all of them (multi-objective TPE)
    searcher = (_MultiObjectiveOptuna if multi else OptunaSearch)(
                            space=dists, metric=list(s.objectives) if multi else s.objective,
                            mode=list(s.modes) if multi else s.mode,
                            points_to_evaluate=[{k: v for k, v in pt.items() if k in dists}
                                                for pt in space.points_to_evaluate] or None,
                            sampler=sampler)
    for params, value in space.warm.trials if space.warm is not None else ():
        searcher.add_evaluated_point({k: v for k, v in params.items() if k in dists}, value)
    return searcher


class _MultiObjectiveOptuna(OptunaSearch):
    """OptunaSearch for several objectives: a trial that ended without one of them (a diverged run
    reports only the bounded metrics) is told as failed, not as a list holding None, which Optuna
    rejects, leaving the trial running in the study."""

    def on_trial_complete(self, trial_id, result=None, error=False):
        if result and any(result.get(m) is None for m in self.metric):
            result, error = None, True
        super().on_trial_complete(trial_id, result, error)


def _scheduler(space):
    from ray.tune.schedulers import FIFOScheduler, MedianStoppingRule

    s = space.search
    if s.scheduler == "asha":
        return ASHAScheduler(time_attr=s.time_attr, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, max_t=s.max_t)
    if s.scheduler == "hyperband":
        return AsyncHyperBand.of(s)
    if s.scheduler == "median":
        return MedianStoppingRule(time_attr=s.time_attr, grace_period=s.grace_period, min_samples_required=3)
    return FIFOScheduler()


def hyperband_brackets(grace_period: float, reduction_factor: float, max_t: float) -> int:
    """How many brackets, s_max + 1, so that bracket s first cuts at grace_period * eta**s and the
    last cuts nothing: s_max = ceil(log_eta(max_t / grace_period)) (HyperBand's floor when
    max_t / grace_period is a power of eta; else one more, since Ray's ASHA bracket s keeps
    int(log_eta(max_t / grace_period) - s + 1) rungs and only a bracket with none runs every
    trial to max_t)."""
    return int(math.ceil(math.log(max_t / grace_period) / math.log(reduction_factor) - 1e-9)) + 1


class AsyncHyperBand(ASHAScheduler):
    """`scheduler: hyperband`: asynchronous HyperBand (Li et al., "A System for Massively Parallel
    Hyperparameter Tuning", 2020, sec. 3.3): ASHA over all of HyperBand's brackets
    (`hyperband_brackets`), from the aggressive one (first cut at grace_period) to one that never
    cuts, each trial placed in one.

    Not Ray's synchronous HyperBandScheduler: it waits for a bracket to fill (7 trials for 600
    steps at eta 3) counting only live trials, so under a concurrency limit every trial lands in
    its no-cut bracket; and it PAUSEs trials, which this trainable cannot resume (its Tune
    checkpoint is empty: Train keeps the checkpoints), and a paused trial it then stops is told to
    Optuna as PRUNED. Measured: 12 of 12 trials ran to max_t (bench/early_stopping.py).
    Ray's ASHAScheduler(brackets=k) places trials with the global numpy RNG; here a generator
    seeded with the search's seed does, with Ray's probabilities (softmax of the brackets' rung
    counts), so the placement repeats with the seed."""

    def __init__(self, seed: int, **kwargs):
        super().__init__(**kwargs)
        self._rng = np.random.default_rng(seed)

    @classmethod
    def of(cls, s) -> "AsyncHyperBand":
        return cls(s.seed, time_attr=s.time_attr, grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                   max_t=s.max_t, brackets=hyperband_brackets(s.grace_period, s.reduction_factor, s.max_t))

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)  # checks metric/mode, places with np.random
        sizes = np.array([len(b._rungs) for b in self._brackets])
        p = np.exp(sizes - sizes.max())
        self._trial_info[trial.trial_id] = self._brackets[self._rng.choice(len(sizes), p=p / p.sum())]


class DivergenceStopper(Stopper):
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


if __name__ == "__main__":  # `python -m simpo_ray.tune`: the command line is in cli.py
    from simpo_ray.cli import tune_main
    sys.exit(tune_main())
