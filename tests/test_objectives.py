"""Multi-objective searches: settings, the searcher's study, the Pareto front. (No Ray search: the
searcher is driven by hand as Tune drives it.)"""

import pandas as pd
import pytest

from simpo_ray.errors import ConfigError
from simpo_ray.search.objectives import pareto_front
from simpo_ray.search.plan import load

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TINY = ROOT / "search_spaces" / "cpu-tiny.yaml"
TWO = {"search.objective": ["eval/reward_win_rate_lc", "eval/sft_loss"], "search.scheduler": "fifo"}


def test_a_list_objective_is_a_multi_objective_search_with_the_first_as_primary(capsys):
    from simpo_ray.search.describe import describe_space

    s = load(TINY, overrides=TWO).search
    assert (s.objective, s.mode) == ("eval/reward_win_rate_lc", "max")
    assert (s.objectives, s.modes) == (("eval/reward_win_rate_lc", "eval/sft_loss"), ("max", "min"))
    assert "objectives eval/reward_win_rate_lc (max), eval/sft_loss (min)" in describe_space(load(TINY, overrides=TWO))
    assert load(TINY, overrides={**TWO, "search.scheduler": "median"}).search.scheduler == "median"


@pytest.mark.parametrize("change, needle", [
    ({"search.scheduler": "asha"}, "search.scheduler: asha cuts trials on one metric and cannot serve"),
    ({"search.scheduler": "hyperband"}, "search.scheduler: hyperband cuts trials on one metric"),
    ({"search.mode": ["max", "max"]}, "search.mode: 'max' is wrong for eval/sft_loss"),
    ({"search.mode": ["max"]}, "must give one mode per objective"),
    ({"search.objective": ["eval/sft_loss", "eval/sft_loss"]}, "two or more different metrics"),
    ({"search.objective": ["eval/sft_loss", "eval/nope"]}, "'eval/nope' is not a metric a search can use"),
    ({"base.reward_model_name_or_path": None}, "eval/reward_win_rate_lc needs base.reward_model_name_or_path"),
])
def test_bad_multi_objective_settings_are_one_line_errors(change, needle):
    with pytest.raises(ConfigError) as info:
        load(TINY, overrides={**TWO, **change})
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_the_searcher_tells_optuna_every_objective_and_a_diverged_trial_fails():
    import optuna

    from simpo_ray.search.searcher import make_searcher

    searcher = make_searcher(load(TINY, overrides=TWO))
    searcher.set_search_properties(None, None, {})
    ids = [f"t{i}" for i in range(3)]
    configs = [searcher.suggest(t) for t in ids]
    assert configs[0]["sft_weight"] == 0.0  # the documented default still runs first
    searcher.on_trial_complete("t0", {"eval/reward_win_rate_lc": 0.4, "eval/sft_loss": 1.5})
    searcher.on_trial_complete("t1", {"eval/reward_win_rate_lc": 0.6, "eval/sft_loss": 2.0})
    searcher.on_trial_complete("t2", {"eval/reward_win_rate_lc": 0.0, "diverged": 1})  # no sft_loss
    study = searcher._ot_study
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert [t.values for t in study.trials[:2]] == [[0.4, 1.5], [0.6, 2.0]]
    assert study.trials[2].state == optuna.trial.TrialState.FAIL
    assert {t.number for t in study.best_trials} == {0, 1}  # neither dominates the other


def test_pareto_front_by_hand():
    t = pd.DataFrame({"trial_id": list("abcdef"), "status": ["completed"] * 4 + ["diverged", "completed"],
                      "win": [0.6, 0.5, 0.4, 0.6, 0.9, None], "loss": [1.0, 0.8, 0.9, 1.2, 0.1, 0.5]})
    front = pareto_front(t, [("win", "max"), ("loss", "min")])
    # a: best win (ties d, better loss); b: best loss; c: dominated by b; d: dominated by a;
    # e diverged and f has no win: never on the front.
    assert list(t["trial_id"][front]) == ["a", "b"]


def test_resolved_space_of_a_single_objective_search_is_as_before():
    from simpo_ray.search.records import resolved_space

    r = resolved_space(load(TINY))
    assert "objectives" not in r["search"] and "modes" not in r["search"]
    assert "max_new_tokens" not in r["base"] and "generation_top_p" not in r["base"]
    assert r["base"]["reward_model_name_or_path"] == "bundled:reward"  # set in the space: kept


def test_a_step_reported_again_after_a_resume_is_told_to_optuna_once(recwarn):
    """A trial rerun after `--resume` reports its training iterations from 1 again: Optuna keeps
    the first value and used to warn `step=1 is already reported` for each repeat."""
    from simpo_ray.search.searcher import make_searcher

    space = load(TINY)
    searcher = make_searcher(space)
    searcher.set_search_properties(space.search.objective, space.search.mode, {})
    searcher.suggest("t1")
    for value in (0.2, 0.3):  # the first attempt, then the rerun
        searcher.on_trial_result("t1", {space.search.objective: value, "training_iteration": 1})
    searcher.on_trial_result("t1", {space.search.objective: 0.4, "training_iteration": 2})
    frozen = searcher._ot_study.get_trials(deepcopy=False)[0]
    assert frozen.intermediate_values == {1: 0.2, 2: 0.4}
    assert not [w for w in recwarn if "already reported" in str(w.message)]
