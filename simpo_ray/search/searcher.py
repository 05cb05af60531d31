"""The searcher and the schedulers of a search: Optuna's TPE or random sampler over the space
(`make_searcher`), ASHA / asynchronous HyperBand / median stopping / FIFO (`make_scheduler`),
the divergence stopper, the disk watch, and the progress table Tune prints (`make_reporter`).
No tensors."""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

import numpy as np
import optuna
from ray.tune import Callback, CLIReporter, Stopper
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch


def make_searcher(space, storage=None, study_name: str | None = None):
    """Optuna over the searched parameters, seeded: TPE (constant_liar keeps parallel trials apart)
    or, with `search.sampler: random`, Optuna's RandomSampler (the baseline TPE is measured against).
    Both evaluate the same `points_to_evaluate` first. `storage` (an Optuna storage,
    `simpo_ray.search.study`) keeps the study where Optuna's tools read it, named `study_name`.

    A warm start's same-size trials (`space.warm.trials`) go into the study as COMPLETE trials
    with their values (`OptunaSearch.add_evaluated_point`: `study.add_trial`), after the points
    are enqueued, so they run nothing and the points keep their order (`ask` takes the WAITING
    trials first). Not `evaluated_rewards`: with it OptunaSearch tells EVERY point of
    `points_to_evaluate` as evaluated and enqueues none, the documented default included."""
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
    searcher = (_MultiObjectiveOptuna if multi else _Optuna)(
                            space=dists, metric=list(s.objectives) if multi else s.objective,
                            mode=list(s.modes) if multi else s.mode,
                            points_to_evaluate=[{k: v for k, v in pt.items() if k in dists}
                                                for pt in space.points_to_evaluate] or None,
                            sampler=sampler, storage=storage, study_name=study_name)
    for params, value in space.warm.trials if space.warm is not None else ():
        searcher.add_evaluated_point({k: v for k, v in params.items() if k in dists}, value)
    return searcher


class _Optuna(OptunaSearch):
    """OptunaSearch that keeps the study true for Optuna's own tools (`optuna.load_study`,
    optuna-dashboard), which read the same storage:

    - each trial's state: COMPLETE for a trial that ran its budget, PRUNED for one the scheduler
      stopped (its value is then its last report's, and TPE ranks it below every finished trial,
      as Optuna's own pruners do), FAIL for an error or a final value that is missing or not
      finite. A diverged trial of a bounded objective (a rate: the run reports its worst value)
      stays COMPLETE at that value, which is what teaches TPE to avoid the region (a FAIL trial is
      invisible to TPE); of an unbounded one (eval/loss ...) it has no value and is FAIL. The user
      attributes `trial_id` (Tune's, as in trials.csv) and `status` (trials.csv's) link the two;
    - the objective of every report, at its training step (`step`, as in curves.csv), the last
      one included, once per step: a trial rerun after a `--resume` reports its steps again, and
      Optuna keeps the first value of a step and warns (`step=1 is already reported`) for each repeat;
    - a trial the storage holds as finished is not told again (a driver killed after a trial ended
      but before Tune saved the searcher reruns the trial on resume), and on resume a RUNNING
      trial Tune no longer knows of (asked after the last save) is marked FAIL (an enqueued start
      point among them is enqueued again, so the default still runs). Trials cut by Ctrl-C stay
      RUNNING until the search is resumed."""

    def suggest(self, trial_id):
        params = super().suggest(trial_id)
        trial = self._ot_trials.get(trial_id)
        if trial is not None and params is not None:
            trial.set_user_attr("trial_id", trial_id)
        return params

    def on_trial_result(self, trial_id, result):
        self._report(trial_id, result)

    def _report(self, trial_id, result) -> None:
        """The objective at the report's training step (the step curves.csv shows; Ray reports at
        its own result count), once per step, and never to a finished trial. Optuna keeps no
        intermediate values for several objectives."""
        trial = self._ot_trials.get(trial_id)
        if isinstance(self.metric, list) or trial is None or trial_id in self._completed_trials:
            return
        value, step = result.get(self.metric), result.get("step", result.get(TRAINING_ITERATION))
        if value is None or step is None or not math.isfinite(value):
            return
        frozen = _frozen(trial)
        if not frozen.state.is_finished() and int(step) not in frozen.intermediate_values:
            trial.report(float(value), int(step))

    def on_trial_complete(self, trial_id, result=None, error=False):
        trial = self._ot_trials.get(trial_id)
        if trial is None or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        if _frozen(trial).state.is_finished():  # told before the driver died: the study keeps it
            self._completed_trials.add(trial_id)
            return None
        if result:  # the last report: Tune tells a scheduler's or a stopper's STOP no on_trial_result
            self._report(trial_id, result)
        status = (result or {}).get("status")
        if status is not None:
            trial.set_user_attr("status", "stopped_early" if status == "running" else status)
        state = None
        if result and status == "running":  # the scheduler stopped it (a finished run says "completed")
            state = optuna.trial.TrialState.PRUNED
        elif result and not isinstance(self.metric, list) and not _finite(result.get(self.metric)):
            # No value to give: a diverged run of an unbounded objective (eval/loss ...) reports none,
            # and NaN is refused by Optuna (Ray's searcher would log it and leave the trial RUNNING).
            state = optuna.trial.TrialState.FAIL
        if state is not None:
            self._ot_study.tell(trial, None, state=state)
            self._completed_trials.add(trial_id)
            return None
        return super().on_trial_complete(trial_id, result, error)

    def restore(self, checkpoint_path):
        super().restore(checkpoint_path)
        known = {t.number for t in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for orphan in (t for t in running if t.number not in known):
            self._ot_study._storage.set_trial_user_attr(orphan._trial_id, "status", "lost")
            self._ot_study.tell(orphan.number, None, state=optuna.trial.TrialState.FAIL)
            if "fixed_params" in orphan.system_attrs:  # an enqueued start point (the default): ask it again
                self._ot_study.enqueue_trial(orphan.system_attrs["fixed_params"])


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _frozen(trial):
    """A live Optuna `Trial`'s stored record (its reports and state, as the storage holds them)."""
    return trial.study._storage.get_trial(trial._trial_id)


class _MultiObjectiveOptuna(_Optuna):
    """OptunaSearch for several objectives: a trial that ended without one of them (a diverged run
    reports only the bounded metrics) is told as failed, not as a list holding None, which Optuna
    rejects, leaving the trial running in the study."""

    def on_trial_complete(self, trial_id, result=None, error=False):
        if result and any(result.get(m) is None for m in self.metric):
            result, error = None, True
        super().on_trial_complete(trial_id, result, error)


def make_scheduler(space):
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


def make_reporter(space):
    metrics = {"step": "step", space.search.objective: space.search.objective.split("/")[-1],
               "eval/preference_accuracy": "pref_acc", "loss": "loss"}
    # (not our "status" metric: for a trial ASHA stopped it still says "running", its value at
    # the last report, beside Tune's own TERMINATED)
    return CLIReporter(
        metric_columns=metrics,
        parameter_columns={"learning_rate": "lr", "beta": "beta", "gamma_beta_ratio": "g/b", "sft_weight": "sft"},
        max_report_frequency=30, sort_by_metric=True, max_progress_rows=12,
    )


class DiskWatch(Callback):
    """Stops the search like Ctrl-C once `disk.low(root, reserve)` (checked every `every_s`
    seconds of Tune's loop): it sends this process SIGUSR1, which Tune handles as it handles
    SIGINT (state saved, trials stopped). Pickled with the Tuner, so a resume keeps watching."""

    def __init__(self, root: str, reserve: int, every_s: float = 2.0) -> None:
        self.root, self.reserve, self.every_s = root, reserve, every_s
        self._next = 0.0
        self._fired = False

    def on_step_begin(self, iteration, trials, **info) -> None:
        from simpo_ray.search import disk

        now = time.monotonic()
        if self._fired or now < self._next:
            return
        self._next = now + self.every_s
        reason = disk.low(self.root, self.reserve)
        if reason:
            self._fired = True
            if not callable(signal.getsignal(signal.SIGUSR1)):  # Tune off the main thread: no handler
                print(f"[simpo-ray] warning: {reason}; the search cannot stop itself here (not in the main "
                      "thread): free space or stop it", flush=True)
                disk.stopped(self.root)  # it was not stopped by this
                return
            print(f"[simpo-ray] {reason}; stopping the search (resumable) ...", flush=True)
            os.kill(os.getpid(), signal.SIGUSR1)
