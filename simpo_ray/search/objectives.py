"""Search objectives: the metrics a search may rank by, with the direction that is better; which
need a reward model or generation; the check of an objective against a space's training config;
the Pareto front of a multi-objective search.

`search.objective` is one metric, or a list of them (a multi-objective search: Optuna's TPE
sampler, which handles several objectives, proposes; the first one is the primary, which names the
best trial, the kept checkpoints and what a median scheduler judges; the analysis shows the
Pareto front).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from simpo_ray.errors import ConfigError

if TYPE_CHECKING:
    from simpo_ray.config import TrainConfig

# Metrics the training loop reports under eval/, with the direction that is better.
OBJECTIVES = {
    "eval/preference_accuracy": "max",
    "eval/success_rate": "max",        # bundled task only
    "eval/reward_win_rate_lc": "max",  # these three need base.reward_model_name_or_path
    "eval/reward_win_rate": "max",
    "eval/reward_mean": "max",
    "eval/rewards/accuracies": "max",
    "eval/rewards/margins": "max",
    "eval/loss": "min",
    "eval/sft_loss": "min",
}
Objective = Literal[
    "eval/preference_accuracy", "eval/success_rate", "eval/reward_win_rate_lc", "eval/reward_win_rate",
    "eval/reward_mean", "eval/rewards/accuracies",
    "eval/rewards/margins", "eval/loss", "eval/sft_loss",
]
assert set(typing.get_args(Objective)) == set(OBJECTIVES)


REWARD_OBJECTIVES = ("eval/reward_win_rate_lc", "eval/reward_win_rate", "eval/reward_mean")
FALLBACK_OBJECTIVE = "eval/preference_accuracy"


def check_objective(search: Any, cfg: TrainConfig, notes: list[str]) -> Any:
    """The objective the search can use with `cfg`: a reward objective without a reward model
    falls back to preference accuracy (with a note); preference accuracy on real data gets a note
    that it cannot see generation quality; the objectives that need generation are refused
    without it."""
    bundled = all(k.startswith("bundled:") for k in cfg.dataset_mixer)
    if search.objectives:
        for name in search.objectives:  # each one must be servable; none may fall back
            if name in REWARD_OBJECTIVES and not cfg.reward_model_name_or_path:
                raise ConfigError(f"search.objective: {name} needs base.reward_model_name_or_path")
            if name in GENERATION_OBJECTIVES and cfg.generation_eval_samples == 0:
                raise ConfigError(f"search.objective: {name} needs base.generation_eval_samples > 0")
    if search.objective in REWARD_OBJECTIVES:
        if not cfg.reward_model_name_or_path:
            notes.append(f"search.objective {search.objective} needs base.reward_model_name_or_path, which is "
                         f"not set: trials are ranked by {FALLBACK_OBJECTIVE} instead")
            search = dataclasses.replace(search, objective=FALLBACK_OBJECTIVE, mode=OBJECTIVES[FALLBACK_OBJECTIVE])
        elif cfg.generation_eval_samples == 0:
            raise ConfigError(f"search.objective: {search.objective} needs base.generation_eval_samples > 0 "
                              "(0 turns generation off)")
    if (any(o in GENERATION_OBJECTIVES for o in search.objectives or (search.objective,)) and cfg.generation_eval_steps
            and cfg.generation_eval_steps != cfg.eval_steps):
        raise ConfigError(f"search.objective: {'/'.join(search.objectives or (search.objective,))} is measured every generation_eval_steps "
                          f"({cfg.generation_eval_steps}) but reported every eval_steps ({cfg.eval_steps}): the "
                          "search would rank carried-forward values; set eval_steps to "
                          f"{cfg.generation_eval_steps} and drop generation_eval_steps")
    if search.objective == FALLBACK_OBJECTIVE and not bundled:
        notes.append(f"{FALLBACK_OBJECTIVE} cannot see generation quality (a model can rank chosen over "
                     "rejected while its answers ramble or collapse); set base.reward_model_name_or_path "
                     "and search.objective: eval/reward_win_rate_lc")
    if search.objective != "eval/success_rate":
        return search
    other = [k for k in cfg.dataset_mixer if not k.startswith("bundled:")]
    if other:
        raise ConfigError(f"search.objective: eval/success_rate is reported only for the bundled "
                          f"task (dataset bundled:sort), but base.dataset_mixer has {other[0]!r}; "
                          "use eval/preference_accuracy")
    if cfg.generation_eval_samples == 0:
        raise ConfigError("search.objective: eval/success_rate needs base.generation_eval_samples > 0 "
                          "(0 turns the success-rate evaluation off)")
    return search


GENERATION_OBJECTIVES = (*REWARD_OBJECTIVES, "eval/success_rate")
# Schedulers that can serve several objectives: FIFO (stops nothing), and the median rule judging
# the primary objective. ASHA and HyperBand promote or cut trials on one metric by design.
MULTI_OBJECTIVE_SCHEDULERS = ("fifo", "median")


def validate_multi(search: Any) -> None:
    """The multi-objective settings of `search` (its `objectives` / `modes`), in one-line errors."""
    if not search.objectives:
        return
    names = list(search.objectives)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfigError(f"search.objective: {names} must name two or more different metrics "
                          "(or give one metric, not a list)")
    for name in names:
        if name not in OBJECTIVES:
            raise ConfigError(f"search.objective: {name!r} is not a metric a search can use; allowed: "
                              f"{', '.join(OBJECTIVES)}")
    if len(search.modes) != len(names):
        raise ConfigError(f"search.mode: {list(search.modes)} must give one mode per objective {names}")
    for name, mode in zip(names, search.modes):
        if mode != OBJECTIVES[name]:
            raise ConfigError(f"search.mode: {mode!r} is wrong for {name}, which is better when "
                              f"{'higher' if OBJECTIVES[name] == 'max' else 'lower'}; use {OBJECTIVES[name]}")
    if search.scheduler not in MULTI_OBJECTIVE_SCHEDULERS:
        raise ConfigError(f"search.scheduler: {search.scheduler} cuts trials on one metric and cannot serve the "
                          f"objectives {names}; use fifo, or median (which judges the first, {names[0]})")
    if search.warm_start:
        raise ConfigError("search.warm_start: a multi-objective search cannot be warm-started "
                          "(finished trials carry one objective value)")


def split_objective(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw `search` mapping whose `objective` is a list → the primary in `objective`/`mode`,
    all of them in `objectives`/`modes` (modes from the list given, else each metric's own, a
    single `mode` being the first one's)."""
    objective = raw.get("objective")
    if not isinstance(objective, list):
        return raw
    names = [str(o) for o in objective]
    modes = raw.get("mode")
    if not isinstance(modes, list):  # one mode (or none): each metric's own; the one given must fit the first
        first = modes
        modes = [OBJECTIVES.get(n, "max") for n in names]
        if first is not None and modes:
            modes[0] = first
    return {**raw, "objective": names[0] if names else None, "mode": modes[0] if modes else None,
            "objectives": names, "modes": [str(m) for m in modes]}


def non_dominated(values: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.Series:
    """The one Pareto rule: True for each row that no other row dominates on the (column, mode)
    pairs (at least as good on every one and better on one). Rows with a missing value are
    never on the front."""
    signed = pd.DataFrame({c: pd.to_numeric(values[c], errors="coerce") * (1 if m == "max" else -1)
                           for c, m in objectives}, index=values.index)
    front = pd.Series(False, index=values.index)
    cand = signed[signed.notna().all(axis=1)]
    for i, row in cand.iterrows():
        front[i] = not ((cand >= row).all(axis=1) & (cand > row).any(axis=1)).any()
    return front


def pareto_front(trials: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.Series:
    """`non_dominated` among the trials that ran their whole budget (status completed), whose
    final values are of the same step. A trial stopped early is never on the front, nor does it
    push a completed trial off it: its values are from an earlier step (under median stopping a
    stopped trial's lower `eval/sft_loss` says it trained less, not that it drifted less), and
    Optuna is told it was PRUNED. Diverged and errored trials are off it too."""
    ok = trials["status"] == "completed"
    front = pd.Series(False, index=trials.index)
    front[ok] = non_dominated(trials[ok], objectives)
    return front


def final_column(metric: str, primary: str) -> str:
    """The trials.csv column holding a trial's final value of `metric`."""
    return "objective_value" if metric == primary else f"final_{metric}"


def describe(search: Any) -> str:
    """`eval/x (max)`, or for several objectives all of them, the primary first."""
    if not search.objectives:
        return f"{search.objective} ({search.mode})"
    return ("objectives " + ", ".join(f"{o} ({m})" for o, m in zip(search.objectives, search.modes))
            + f" (Pareto front; the first is primary)")
