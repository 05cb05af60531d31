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


def make_searcher(space):
    """Optuna over the searched parameters, seeded: TPE (constant_liar keeps parallel trials apart)
    or, with `search.sampler: random`, Optuna's RandomSampler (the baseline TPE is measured against).
    Both evaluate the same `points_to_evaluate` first.

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
                            sampler=sampler)
    for params, value in space.warm.trials if space.warm is not None else ():
        searcher.add_evaluated_point({k: v for k, v in params.items() if k in dists}, value)
    return searcher


class _Optuna(OptunaSearch):
    """OptunaSearch that reports a step of a trial to Optuna once: a trial rerun after a
    `--resume` reports its training iterations again from 1, and Optuna keeps the first value of
    a step and warns (`UserWarning: step=1 is already reported`) for every repeat."""

    def on_trial_result(self, trial_id, result):
        trial = self._ot_trials.get(trial_id)
        step = result.get(TRAINING_ITERATION)
        if trial is not None and not isinstance(self.metric, list) and step in _reported_steps(trial):
            return
        super().on_trial_result(trial_id, result)


def _reported_steps(trial) -> set:
    """The steps an Optuna trial (a `Trial` from `study.ask`) already holds values for."""
    frozen = [t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number]
    return set(frozen[0].intermediate_values) if frozen else set()


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
