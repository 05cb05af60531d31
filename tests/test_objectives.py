"""Multi-objective searches: settings, the searcher's study, the Pareto front. (No Ray search: the
searcher is driven by hand as Tune drives it.)"""

import copy

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


def test_a_trial_stopped_early_is_kept_off_the_front_though_its_earlier_values_dominate():
    """Median stopping cut `cut` at step 100, where its sft_loss was low because it had trained
    little: by those values it dominates both completed trials, compared at their last step (600).
    It is not on the front, and they stay on it."""
    t = pd.DataFrame({"trial_id": ["done1", "done2", "cut"], "status": ["completed", "completed", "stopped_early"],
                      "steps": [600, 600, 100], "win": [0.55, 0.50, 0.60], "sft": [1.3, 1.1, 0.7]})
    assert list(t["trial_id"][pareto_front(t, [("win", "max"), ("sft", "min")])]) == ["done1", "done2"]


def test_resolved_space_of_a_single_objective_search_is_as_before():
    from simpo_ray.search.records import resolved_space

    r = resolved_space(load(TINY))
    assert "objectives" not in r["search"] and "modes" not in r["search"]
    assert "max_new_tokens" not in r["base"] and "generation_top_p" not in r["base"]
    assert r["base"]["reward_model_name_or_path"] == "bundled:reward"  # set in the space: kept
    # The reference's keys honoured since 2026-12-04 and the study's storage, at their defaults, are
    # absent as in a search.json written before them: such a search still resumes.
    new = {"model_revision", "torch_dtype", "use_liger_kernel", "warmup_steps", "optim", "adam_beta1", "adam_beta2",
           "adam_epsilon", "report_to", "overwrite_output_dir"}
    assert not new & set(r["base"]) and "optuna_storage" not in r["search"]
    # A record written when those keys were stored at their defaults (commits of 2026-12-04, and
    # torch_compile since f2b992a) compares equal too: no "the space differs" on --resume.
    from simpo_ray.search.records import space_differences

    written = copy.deepcopy(r)
    written["base"].update(torch_compile=None, model_revision=None, torch_dtype=None, use_liger_kernel=False,
                           warmup_steps=0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                           report_to=None, overwrite_output_dir=False)
    written["search"].update(optuna_storage=None, warm_start=[], tpe_startup_trials=None)
    assert space_differences(written, r) == [] and space_differences(r, written) == []
    changed = copy.deepcopy(written)
    changed["base"]["adam_beta1"] = 0.8
    assert space_differences(changed, r) == ["base.adam_beta1: 0.8 -> '<unset>'"]
    url = "postgresql://u:secret@db.internal/optuna"
    assert resolved_space(load(TINY, overrides={"search.optuna_storage": url}))["search"]["optuna_storage"] == \
        "postgresql://u:***@db.internal/optuna"  # no password in search.json


def test_a_step_reported_again_after_a_resume_is_told_to_optuna_once(recwarn):
    """A trial rerun after `--resume` reports its training steps again: Optuna keeps the first
    value and used to warn `step=1 is already reported` for each repeat. Steps are the reports'
    training steps (curves.csv's), not Tune's result count."""
    from simpo_ray.search.searcher import make_searcher

    space = load(TINY)
    searcher = make_searcher(space)
    searcher.set_search_properties(space.search.objective, space.search.mode, {})
    searcher.suggest("t1")
    for value in (0.2, 0.3):  # the first attempt, then the rerun
        searcher.on_trial_result("t1", {space.search.objective: value, "training_iteration": 1, "step": 0})
    searcher.on_trial_result("t1", {space.search.objective: 0.4, "training_iteration": 2, "step": 100})
    frozen = searcher._ot_study.get_trials(deepcopy=False)[0]
    assert frozen.intermediate_values == {0: 0.2, 100: 0.4}
    assert frozen.user_attrs == {"trial_id": "t1"}
    assert not [w for w in recwarn if "already reported" in str(w.message)]


def _searcher(tmp_path, name="s"):
    from simpo_ray.search import study
    from simpo_ray.search.searcher import make_searcher

    space = load(TINY)
    url = study.url_for(None, str(tmp_path))
    searcher = make_searcher(space, study.open_storage(url), name)
    searcher.set_search_properties(space.search.objective, space.search.mode, {})
    return searcher, space.search.objective, url


def test_the_study_optuna_opens_holds_each_trials_state_reports_and_tune_id(tmp_path):
    """What `optuna.load_study` reads from the search's storage, trial by trial: the scheduler's
    stop is PRUNED at its last report (the one Tune passes with the stop and no on_trial_result),
    a run to its end COMPLETE, an error FAIL, a divergence COMPLETE at the value it reported."""
    import optuna

    searcher, metric, url = _searcher(tmp_path)
    for tid in ("done", "cut", "boom", "nan"):
        searcher.suggest(tid)
    searcher.on_trial_result("done", {metric: 0.1, "step": 0, "status": "running"})
    searcher.on_trial_complete("done", {metric: 0.6, "step": 50, "status": "completed"})
    searcher.on_trial_result("cut", {metric: 0.1, "step": 0, "status": "running"})
    searcher.on_trial_complete("cut", {metric: 0.3, "step": 20, "status": "running"})
    searcher.on_trial_complete("boom", None, error=True)
    searcher.on_trial_complete("nan", {metric: 0.0, "step": 10, "status": "diverged", "diverged": 1})

    study = optuna.load_study(study_name="s", storage=url)  # a fresh reader, as a notebook opens it
    got = {t.user_attrs["trial_id"]: t for t in study.trials}
    assert {k: t.state.name for k, t in got.items()} == {"done": "COMPLETE", "cut": "PRUNED", "boom": "FAIL",
                                                           "nan": "COMPLETE"}
    assert got["done"].value == 0.6 and got["done"].intermediate_values == {0: 0.1, 50: 0.6}
    assert got["cut"].value == 0.3 and got["cut"].intermediate_values == {0: 0.1, 20: 0.3}
    assert got["boom"].value is None
    assert {k: t.user_attrs.get("status") for k, t in got.items()} == {
        "done": "completed", "cut": "stopped_early", "boom": None, "nan": "diverged"}
    assert got["nan"].value == 0.0


def test_a_resumed_searcher_continues_its_study_and_leaves_no_trial_running(tmp_path):
    """The driver dies after Tune saved the searcher: one trial then finished (told to the
    database, not to the saved state) and one more was asked. The searcher restored from the save
    finishes the study: the rerun trial is not told twice, the orphan is FAIL, new trials follow."""
    import optuna

    searcher, metric, url = _searcher(tmp_path)
    searcher.suggest("a")
    searcher.suggest("b")
    searcher.save(str(tmp_path / "searcher.pkl"))  # Tune's periodic save
    searcher.on_trial_complete("a", {metric: 0.5, "step": 50, "status": "completed"})  # after the save
    searcher.suggest("c")  # after the save: Tune's saved state knows no trial "c"
    del searcher  # SIGKILL

    resumed, _, _ = _searcher(tmp_path / "unused")
    resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.on_trial_result("a", {metric: 0.1, "step": 0, "status": "running"})  # "a" reruns
    resumed.on_trial_complete("a", {metric: 0.4, "step": 50, "status": "completed"})
    resumed.on_trial_complete("b", {metric: 0.7, "step": 50, "status": "completed"})
    resumed.suggest("d")
    resumed.on_trial_complete("d", {metric: 0.2, "step": 50, "status": "completed"})

    study = optuna.load_study(study_name="s", storage=url)
    got = {t.user_attrs["trial_id"]: t for t in study.trials}
    assert {k: (t.state.name, t.value) for k, t in got.items()} == {
        "a": ("COMPLETE", 0.5), "b": ("COMPLETE", 0.7), "c": ("FAIL", None), "d": ("COMPLETE", 0.2)}
    assert got["a"].intermediate_values == {50: 0.5}  # the rerun's reports were not added
    assert got["c"].user_attrs["status"] == "lost"


def test_a_new_search_does_not_add_to_another_searchs_study_or_a_bad_url(tmp_path):
    from simpo_ray.errors import ConfigError, UserError
    from simpo_ray.search import study

    _searcher(tmp_path, name="taken")
    url = study.url_for(None, str(tmp_path))
    with pytest.raises(UserError, match="an Optuna study named 'taken' already exists in sqlite:///"):
        study.refuse_existing(study.open_storage(url), "taken", url)
    study.refuse_existing(study.open_storage(url), "free", url)
    with pytest.raises(ConfigError, match=r"search.optuna_storage: 'redis://h' is not a database URL"):
        load(TINY, overrides={"search.optuna_storage": "redis://h"})
    with pytest.raises(UserError, match="cannot open postgresql://u:\\*\\*\\*@localhost:1/db"):
        study.open_storage("postgresql://u:secret@localhost:1/db")


def test_a_start_point_asked_after_the_last_save_is_asked_again_on_resume(tmp_path):
    """The driver dies after asking the documented default (an enqueued point: the database
    already holds it RUNNING) but before Tune saved the searcher: resumed, the orphan is FAIL and
    the default is proposed again, so it still runs first."""
    searcher, metric, _ = _searcher(tmp_path)
    searcher.save(str(tmp_path / "searcher.pkl"))
    first = searcher.suggest("x")  # the documented default, lost with the driver
    resumed, _, _ = _searcher(tmp_path / "unused")
    resumed.restore(str(tmp_path / "searcher.pkl"))
    assert resumed.suggest("y") == first == load(TINY).points_to_evaluate[0]


@pytest.mark.parametrize("result", [
    {"eval/loss": None, "step": 40, "status": "diverged", "diverged": 1},  # unbounded objective: no value sent
    {"eval/loss": float("nan"), "step": 40, "status": "completed"},
])
def test_a_trial_without_a_final_value_is_fail_not_pruned_at_an_earlier_value(tmp_path, result):
    import optuna

    from simpo_ray.search import study
    from simpo_ray.search.searcher import make_searcher

    space = load(TINY, overrides={"search.objective": "eval/loss", "search.mode": "min"})
    url = study.url_for(None, str(tmp_path))
    searcher = make_searcher(space, study.open_storage(url), "s")
    searcher.set_search_properties(space.search.objective, space.search.mode, {})
    searcher.suggest("t")
    searcher.on_trial_result("t", {"eval/loss": 0.3, "step": 20, "status": "running"})
    searcher.on_trial_complete("t", {**{k: v for k, v in result.items() if v is not None}})
    [t] = optuna.load_study(study_name="s", storage=url).trials
    assert t.state.name == "FAIL" and t.value is None and t.intermediate_values == {20: 0.3}
