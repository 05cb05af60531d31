"""The hyperparameter search: a space, Optuna proposing trials, an early-stopping scheduler, a `Tuner`.

Each trial is one SimPO training run built by `simpo_ray.infra.launch.make_trainer`, started from a
Tune function trainable; `run_search` runs (or resumes) a whole search and `dry_run` describes
its plan. The command line (`python -m simpo_ray.tune`) is in `simpo_ray.cli`. No tensors here.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


from simpo_ray.infra import cluster, ray_workarounds
from simpo_ray.errors import SearchStopped, UserError
from simpo_ray.infra.history import history_callback
from simpo_ray.io import check_name
from simpo_ray.infra.launch import make_trainer, run_in_process
from simpo_ray.infra.launch import prepare_run
from simpo_ray.search import disk, loggers, study
from simpo_ray.search.lock import ExperimentLock
from simpo_ray.search.objectives import describe as describe_objective
from simpo_ray.search.records import BUDGET_KEYS, SearchRecord, space_differences
from simpo_ray.search.plan import experiment_path, loaded, memory_plan, storage_root
from simpo_ray.search.results import TRIAL_HISTORY, finish
from simpo_ray.search.searcher import DiskWatch, DivergenceStopper, make_reporter, make_scheduler, make_searcher
from simpo_ray.search.space import SearchSpace


def run_search(space: SearchSpace | str | os.PathLike, *, storage_path=None, name=None, address=None,
               resume=False, prepared=None, verbose: int = 1, num_samples=None, seed=None, scheduler=None,
               sampler=None, max_concurrent=None, task=None, model_type=None, overrides=None,
               allow_out_of_range=False, warm_start=None, warm_start_narrow=None,
               resume_command: str | None = None) -> Path:
    """Run (or resume) a search; returns the experiment directory with the results tables.

    `space`: a loaded `SearchSpace`, or a space file loaded here with the load options
    (`num_samples` ... `warm_start_narrow`, as `load`). A warm-started space (`space.warm`)
    hands its same-size trials to the searcher as completed trials (`make_searcher`). `prepared`: the `launch.check_inputs`
    result for the space's default config when the caller already has it. `resume_command`:
    the command line printed to continue the search if it is interrupted (default: one built
    from these arguments).

    The experiment is locked for the whole search (`simpo_ray.search.lock`): a second search of the
    same storage path and name is refused with one line naming the holder. A `--resume` whose
    space resolves differently from the one recorded in search.json is refused too.
    """
    load_options = dict(task=task, model_type=model_type, allow_out_of_range=allow_out_of_range,
                        num_samples=num_samples, seed=seed, scheduler=scheduler, sampler=sampler,
                        max_concurrent=max_concurrent, overrides=overrides, warm_start=warm_start,
                        warm_start_narrow=warm_start_narrow)
    space = loaded(space, load_options)
    name = check_name(name) if name is not None else space.name
    cluster.check_writable(storage_root(storage_path))
    if resume_command is None:
        resume_command = _resume_command(space.source, storage_path, name, address, load_options)
    if resume:  # checked again under the lock; here so that a mistyped name creates nothing
        _check_resumable(experiment_path(storage_path, name), whole=False)
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

    space_file = space.source
    root = storage_root(storage_path)
    exp_path = experiment_path(storage_path, name)
    record = _check_storage(exp_path, resume=resume, record=SearchRecord.from_space(space, space_file, name),
                            verbose=verbose)
    memory_plan(space)  # a trial that cannot fit its GPUs is refused before Ray starts
    report_to = loggers.backends(space.default_config().report_to)
    loggers.check_installed(report_to)
    loggers.quiet_clients()
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
    need = disk.need(space, slots)
    warning = disk.check(space, root, slots)  # refuses when not even one round of checkpoints fits
    if warning:
        _say(verbose, f"[simpo-ray] {warning}")
    _say(verbose, "[simpo-ray] preparing data and model once for all trials ...")
    t0 = time.perf_counter()
    run = prepare_run(space.default_config(), prepared)
    _say(verbose, f"[simpo-ray] {run.num_train} training pairs, {run.num_eval} held-out pairs "
                  f"ready in {time.perf_counter() - t0:.1f}s")
    # After every refusal above, which leave nothing in the experiment directory (a resume reopens
    # the storage its pickled searcher holds).
    study_storage = _open_study(space, exp_path, name, record, resume)
    _say(verbose, f"[simpo-ray] {study.describe(record.search.get('optuna_study'))}")
    trainable = trial_trainable(space, run.data, exp_path)
    record.write(exp_path)  # state: running (a finished or interrupted search says so at the end)
    if resume:
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=False,
                                   restart_errored=False, resume_unfinished=True)
    else:
        in_process = in_process_trials(space, exp_path)
        callbacks = loggers.callbacks(report_to, exp_path, name)  # pickled with the Tuner, kept on resume
        if need:
            callbacks.append(DiskWatch(root, need.in_flight))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=space.search.objective, mode=space.search.mode,
                search_alg=make_searcher(space, study_storage, name), scheduler=make_scheduler(space),
                num_samples=space.search.num_samples, max_concurrent_trials=slots,
                # An in-process trial's process (its imports, Ray's process start) serves the next
                # trial; a stopped trial's loop is blocked in its report (Tune's function trainables
                # report synchronously) and ends there, so nothing trains after the stop.
                reuse_actors=in_process,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=root, stop=DivergenceStopper(),
                progress_reporter=make_reporter(space), verbose=verbose,
                # In-process trials are restarted by Tune; a Train run restarts its own workers.
                failure_config=tune.FailureConfig(
                    max_failures=space.search.max_failures if in_process else 0),
                callbacks=callbacks,
            ),
        )
    ray_workarounds.quiet_tune_end_hints()  # our summary words the end (and how to resume)
    try:
        grid = _fit(tuner)
        local = finish(grid, space, exp_path, record, verbose=verbose, resume_command=resume_command)
    except OSError as e:  # a write failed although the watch did not see the disk fill (or a URI)
        raise SearchStopped(_write_failed(e, exp_path, resume_command)) from e
    except Exception as e:
        if not _disk_is_full(e, root):
            raise
        raise SearchStopped(_write_failed(e, exp_path, resume_command)) from e
    reason = disk.stopped(root)
    if reason:
        raise SearchStopped(f"{reason}; free space there (each trial's checkpoints are under "
                            f"{exp_path}/train_runs), then resume it with: {resume_command}")
    return local


def _open_study(space: SearchSpace, exp_path: str, name: str, record: SearchRecord, resume: bool):
    """A new search's Optuna storage (None: the study stays in Tune's searcher state), recorded in
    search.json; a refusal before Ray starts when it cannot be opened or already has this study."""
    if resume:  # Tune restores the searcher with the storage it pickled, and search.json says which
        return None
    url = study.url_for(space.search.optuna_storage, exp_path)
    record.search["optuna_study"] = {"name": name, "storage": study.shown(url) if url else None}
    if url is None:
        return None
    storage = study.open_storage(url)
    study.refuse_existing(storage, name, url)
    return storage


def _fit(tuner):
    """`tuner.fit()`, then the caller's SIGINT and SIGUSR1 handlers back: Tune installs its own
    for the run and removes them only when one fires, so after a run that ended by itself a
    Ctrl-C (or SIGTERM, which does what SIGINT does) during the summary and the best model's
    export would only set Tune's finished event and be ignored."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)} if main else {}
    try:
        return tuner.fit()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _disk_is_full(error: BaseException, root: str) -> bool:
    """Whether `error` (or one it came from) is ENOSPC, or the storage is full now: Tune reads
    files a full disk cut short (an empty pickled error, a cut-off JSON) and fails on them."""
    import errno

    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    free = disk.free_bytes(root)
    return free is not None and free < disk.MARGIN


def _write_failed(error: BaseException, exp_path: str, resume_command: str) -> str:
    from simpo_ray.errors import one_line

    free = disk.free_bytes(exp_path)
    where = f" ({disk.size(free)} free there)" if free is not None else ""
    return (f"the search stopped: a write to {exp_path} failed{where}: {one_line(error, with_type=True)}. "
            f"Every report of every trial is in {exp_path}/train_runs/train-*/history.jsonl; free space, "
            f"then resume it with: {resume_command}")


def in_process_trials(space: SearchSpace, exp_path: str) -> bool:
    """Whether trials train in their Tune trial's process (as Ray Train's local mode would, `LocalRun`):
    single-worker trials, `search.local_mode` on, on local storage (a URI keeps Train's own
    persistence), whose strategy the driver decides as DDP (one worker: no wrapper; FSDP, even at
    one worker, and a strategy left to a GPU worker keep Train's process group)."""
    from simpo_ray.io import is_uri
    from simpo_ray.train.memory import decide_strategy

    if not (space.search.local_mode and space.resources.num_workers == 1 and not is_uri(exp_path)):
        return False
    billions = space.estimate.params_billion if space.estimate else None
    return decide_strategy(space.default_config(), space.resources, billions) == "ddp"


def trial_trainable(space: SearchSpace, data: dict[str, Any], exp_path: str, *,
                    train_loop: Callable[[dict], None] | None = None):
    """The Tune function trainable: one `launch.make_trainer` run per trial, reports forwarded to Tune.

    Single-worker trials (`in_process_trials`) run the training loop in the trial's own process,
    through Ray Train's local mode; `LocalRun` writes the checkpoints and history where a Train
    run writes them, and a trial Tune restarts (search.max_failures: it died, or raised) resumes
    from its latest checkpoint. The trial requests the worker's resources.

    Otherwise the trial driver requests no CPU or GPU (only `cluster.DRIVER_MEMORY_BYTES` of
    logical memory): Train reserves the workers' resources in its own placement group, so a
    driver's CPU would only starve them (docs/ray-runtime-notes.md §1), and restarts workers up to
    search.max_failures times itself.

    The tokenised data (`data`, object store references) reaches trials through
    `tune.with_parameters`, never through the trial config, so nothing large is saved with the
    experiment state. The Train run is named after the trial, so a rerun trial resumes from its
    latest checkpoint. `train_loop`: tests only.
    """
    from ray import tune

    from simpo_ray.infra.local_run import LocalRun

    train_storage = f"{exp_path}/train_runs"
    keep = space.search.checkpoint_keep
    max_failures = space.search.max_failures
    # Retention: the `checkpoint_keep` best checkpoints by the search objective, plus the latest
    # (Ray Train never deletes the latest: a restarted worker resumes from it).
    score, order = space.search.objective, space.search.mode
    plan = memory_plan(space)  # the strategy every trial uses (refused before Ray starts if none fits)
    strategy = plan.strategy if plan else None
    local = in_process_trials(space, exp_path)

    def simpo_trial(params: dict, data=None) -> None:
        context = tune.get_context()
        trial_id = context.get_trial_id()
        cfg = space.trial_config(params, save_total_limit=keep, output_dir=None)
        for key, value in cluster.TRAIN_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        # A trial restored from a search started before in-process trials (Tune keeps the
        # resources it asked for then: none) trains as it did then, through Train's workers.
        if local and _holds(context.get_trial_resources().required_resources, space.resources.worker_bundle):
            if not os.path.exists(f"{exp_path}/search.json"):  # written by the driver before any trial
                raise UserError(f"this trial runs on a node that does not see the storage path {exp_path}; "
                                "use storage every node shares (NFS or a URI such as s3://...) or "
                                "search.local_mode: false")
            run = LocalRun(f"{train_storage}/train-{trial_id}", keep=keep, score=score, order=order,
                           forward=tune.report)
            run_in_process(cfg, data, space.resources, run, train_loop=train_loop, strategy=strategy)
            return
        from ray.tune.integration.ray_train import TuneReportCallback

        trainer = make_trainer(
            cfg, data, space.resources, storage_path=train_storage, name=f"train-{trial_id}",
            max_failures=max_failures,
            callbacks=[TuneReportCallback(), history_callback(
                f"{exp_path}/" + TRIAL_HISTORY.format(trial_id=trial_id))],
            checkpoint_score_attribute=score, checkpoint_score_order=order, train_loop=train_loop,
            strategy=strategy,
        )
        trainer.fit()
        ray_workarounds.wait_for_tune_to_take_reports()  # else the trial can hang on its last report

    trainable = tune.with_parameters(simpo_trial, data=data)
    bundle = ({**space.resources.worker_bundle, "memory": cluster.DRIVER_MEMORY_BYTES} if local
              else {"CPU": 0, "memory": cluster.DRIVER_MEMORY_BYTES})
    return tune.with_resources(trainable, tune.PlacementGroupFactory([bundle]))


def _holds(granted: dict[str, float], bundle: dict[str, float]) -> bool:
    """Whether the trial's granted resources include one worker's bundle."""
    return all(granted.get(key, 0.0) + 1e-9 >= need for key, need in bundle.items())


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


def _check_resumable(exp_path: str, *, whole: bool = True) -> None:
    """`UserError` unless `exp_path` holds a search Tune can restore; `whole`: and its state
    files are whole (checked under the lock: a running search may be rewriting them)."""
    from ray import tune

    if not tune.Tuner.can_restore(exp_path):
        raise UserError(f"--resume: {exp_path} holds no search to resume (check --storage-path and --name)")
    damaged = _damaged_tune_state(exp_path) if whole else None
    if damaged:
        raise UserError(f"--resume: Tune's saved state {damaged}, so Tune cannot restore this search (a "
                        f"full disk cuts files short); every trial's reports are kept in {exp_path}/train_runs/"
                        "train-*/history.jsonl and its checkpoints beside them; start a new search with --name")


def _damaged_tune_state(exp_path: str) -> str | None:
    """'<file> is <what is wrong>' for the first of Tune's state files (the latest session's)
    that is empty or, for JSON, does not parse; None when all are whole. Tune would otherwise fail
    on them with a traceback, or restore a search with its trials missing."""
    import json
    import pickletools

    from simpo_ray.io import Storage

    storage = Storage(exp_path)
    latest = {prefix: sorted(n for n in storage.names(prefix) if n.endswith(suffix))
              for prefix, suffix in (("experiment_state-", ".json"), ("search_gen_state-", ".json"),
                                     ("searcher-state-", ".pkl"))}
    for name in ["tuner.pkl"] + [names[-1] for names in latest.values() if names]:
        data = storage.read_bytes(name)
        if not data:
            return f"{storage.path(name)} is empty"
        try:
            if name.startswith("experiment_state-"):
                json.loads(data)
            else:  # pickles (search_gen_state-*.json too): walk the opcodes, executing none
                for _ in pickletools.genops(data):
                    pass
        except ValueError as e:
            return f"{storage.path(name)} is cut short or damaged ({e})"
    return None
