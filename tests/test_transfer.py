"""simpo_ray.transfer.trends: warm-start trials, trends across model sizes, and the extrapolated analysis.

Pure and fast (no Ray, no torch): synthetic searches in memory, and finished search directories
written as the search writes them (`test_analysis.write_search`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_analysis import TINY_SPACE, write_search

from simpo_ray import guide
from simpo_ray.transfer import finished, trends as transfer
from simpo_ray.errors import UserError
from simpo_ray.transfer.model_size import bundled_param_count, param_count
from simpo_ray.search.records import SearchRecord, rank_column

EXPONENT = -0.5


@pytest.fixture(scope="module")
def record() -> SearchRecord:
    from simpo_ray.search.plan import load

    return SearchRecord.from_space(load(TINY_SPACE), TINY_SPACE, "synthetic")


def trials_table(n_params: float, n: int, rng: np.random.Generator, *, c: float = 1e-2,
                 lr_noise: float = 0.1) -> pd.DataFrame:
    """`n` finished trials whose learning rates follow lr = c * N^-0.5 times log-normal noise,
    beta = 2 + 0.5 log10 N, and whose objective is unrelated to the noise (random ranks)."""
    x = math.log10(n_params)
    return pd.DataFrame({
        "trial_id": [f"t{i:02d}" for i in range(n)], "status": "completed", "is_default": False,
        "steps": 12, "objective_value": rng.uniform(0.3, 0.7, n), "best_objective": rng.uniform(0.3, 0.7, n),
        "learning_rate": c * n_params ** EXPONENT * 10 ** rng.normal(0, lr_noise, n),
        "beta": 2 + 0.5 * x + rng.normal(0, 0.2, n), "gamma_beta_ratio": rng.uniform(0.4, 0.6, n),
        "sft_weight": rng.uniform(0.0, 0.1, n)})


def synthetic(record, sizes=(1e8, 1e9, 1e10, 1e11), n: int = 12, seed: int = 0, **kw) -> list[finished.FinishedSearch]:
    rng = np.random.default_rng(seed)
    return [finished.FinishedSearch(Path(f"/synthetic/{i}"), f"s{i}", "7b-8b", f"org/model-{i}", size, "test",
                                    record.objective, record.mode, trials_table(size, n, rng, **kw), record)
            for i, size in enumerate(sizes)]


def width(trend: transfer.Trend, n_params: float) -> float:
    _, low, high = trend.predict(n_params)
    return math.log10(high / low) if trend.log_value else high - low


# ---------------------------------------------------------------- the fit

def test_power_law_exponent_is_recovered(record):
    trends = transfer.fit_trends(synthetic(record))
    lr = trends["learning_rate"]
    assert lr.log_value and lr.slope == pytest.approx(EXPONENT, abs=0.08)
    assert lr.intercept == pytest.approx(-2, abs=0.3)  # log10 c
    assert trends["beta"].slope == pytest.approx(0.5, abs=0.1)
    assert [s.n for s in lr.sizes] == [transfer.TOP_K] * 4
    centre, low, high = lr.predict(3e11)
    assert low < centre < high and centre == pytest.approx(1e-2 * 3e11 ** EXPONENT, rel=0.5)


def alternating(record, n: int, sizes=(1e8, 1e9, 1e10), delta: float = 0.1) -> list[finished.FinishedSearch]:
    """Searches whose trials, best first, lie alternately delta decades above and below the
    power law: any even number of top trials has the same spread and a mean on the line."""
    out = []
    for i, size in enumerate(sizes):
        t = trials_table(size, n, np.random.default_rng(i)).assign(
            best_objective=np.linspace(0.9, 0.5, n), objective_value=np.linspace(0.9, 0.5, n),
            learning_rate=1e-2 * size ** EXPONENT * 10 ** (delta * (-1.0) ** np.arange(n)))
        out.append(finished.FinishedSearch(Path(f"/alt/{i}"), f"a{i}", "7b-8b", f"org/m-{i}", size, "test",
                                           record.objective, record.mode, t, record))
    return out


def test_intervals_widen_farther_from_the_searched_sizes_and_two_sizes_claim_none(record):
    trend = transfer.fit_trends(_planted(record, np.random.default_rng(1), (1e8, 1e9, 1e10, 1e11), 0.2))["learning_rate"]
    assert trend.dof == 2 and trend.weight == 4 and trend.residual_sd > 0
    assert width(trend, 1e13) > width(trend, 1e12) > width(trend, 1e10)
    # The top trials' spread is kept beside each optimum, not counted as data: the alternating
    # trials (0.1 decades each side of the line) give optima on the line and no residual at all.
    on_line = transfer.fit_trends(alternating(record, n=12, sizes=(1e8, 1e9, 1e10, 1e11)), top_k=12)["learning_rate"]
    assert on_line.slope == pytest.approx(EXPONENT) and on_line.residual_sd == pytest.approx(0, abs=1e-9)
    assert [s.spread for s in on_line.sizes] == pytest.approx([0.1 * math.sqrt(12 / 11)] * 4)
    two = transfer.fit_trends(synthetic(record, sizes=(1e8, 1e10)))["learning_rate"]
    assert two.dof == 0 and not two.has_interval and two.predict(1e9)[1:] == (0.0, math.inf)


def _planted(record, rng, sizes, sd_between: float, top_k: int = 5):
    """Searches whose optimum log10 lr lies on the power law plus N(0, sd_between) per size, and
    whose top trials cluster tightly around it (as TPE's do: 0.02 decades)."""
    out = []
    for i, size in enumerate(sizes):
        optimum = math.log10(1e-2 * size ** EXPONENT) + rng.normal(0, sd_between)
        t = trials_table(size, top_k, rng).assign(
            best_objective=np.linspace(0.9, 0.5, top_k), objective_value=np.linspace(0.9, 0.5, top_k),
            learning_rate=10 ** (optimum + rng.normal(0, 0.02, top_k)))
        out.append(finished.FinishedSearch(Path(f"/p/{i}"), f"p{i}", "7b-8b", f"org/p-{i}", size, "test",
                                           record.objective, record.mode, t, record))
    return out


@pytest.mark.parametrize("sizes", [(1e8, 1e9, 1e10), (1e8, 1e9, 1e10, 1e11)])
def test_stated_90_percent_intervals_cover_a_new_sizes_optimum_90_percent_of_the_time(record, sizes):
    """A planted trend with noise between sizes (0.3 decades) and tightly clustered top trials, 400
    draws: the interval at an unsearched size (10x the largest) covers that size's optimum (drawn
    the same way) about 90% of the time (measured 0.91 and 0.89; the earlier fit, top trials as
    independent points, covered it 0.40 and 0.55)."""
    rng = np.random.default_rng(0)
    target = sizes[-1] * 10
    hits = []
    for _ in range(400):
        trend = transfer.fit_trends(_planted(record, rng, sizes, 0.3))["learning_rate"]
        _, low, high = trend.predict(target)
        truth = 1e-2 * target ** EXPONENT * 10 ** rng.normal(0, 0.3)
        hits.append(low <= truth <= high)
    assert 0.86 <= np.mean(hits) <= 0.94, np.mean(hits)


def test_one_size_refuses_in_one_line(record):
    searches = synthetic(record, sizes=(1e9, 1e9))
    with pytest.raises(UserError, match=r"^cannot extrapolate from one model size \(7b-8b/model-0, 1B "
                                        r"parameters.*\); give searches of at least two sizes$") as info:
        transfer.fit_trends(searches[:1])
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="cannot extrapolate from one model size"):
        transfer.fit_trends([searches[0], searches[0]])


def test_predictions_stay_inside_the_documented_range(record):
    # CPU-sized learning rates (1e-3 and up) extrapolated to a 7B model: far above the guide's.
    trends = transfer.fit_trends(synthetic(record, sizes=(1e5, 1e6, 5e6), c=1.0))
    assert trends["learning_rate"].predict(7.24e9)[0] > 1e-6
    predicted = transfer.predict(trends, 7.24e9, "7b-8b")
    point = transfer.predict_point(trends, 7.24e9, "7b-8b")
    for p, x in predicted.items():
        lo, hi = guide.documented_range(p, "7b-8b")
        assert lo <= x.low <= x.centre <= x.high <= hi and point[p] == x.centre
    assert predicted["learning_rate"].centre == 1e-6 and "clipped" in predicted["learning_rate"].note
    notes: list[str] = []
    ranges = transfer.narrowed_ranges(trends, 7.24e9, "7b-8b", notes=notes)
    assert ranges["learning_rate"] == guide.documented_range("learning_rate", "7b-8b")
    assert any("learning_rate" in n and "not narrowed" in n for n in notes)
    lo, hi = ranges["beta"]
    assert 1.0 <= lo < hi <= 10.0 and (lo, hi) != (1.0, 10.0)
    raw = transfer.predict(trends, 7.24e9, "7b-8b", allow_out_of_range=True)["learning_rate"]
    assert raw.centre > 1e-6 and raw.note == ""


def test_leave_one_size_out(record):
    loso = transfer.leave_one_size_out(synthetic(record))
    lr = loso[loso["parameter"] == "learning_rate"]
    assert len(lr) == 4 and set(lr["error_unit"]) == {"decades"}
    assert lr["error"].abs().max() < 0.5 and lr["inside"].mean() >= 0.5
    with pytest.raises(UserError, match="at least three sizes"):
        transfer.leave_one_size_out(synthetic(record, sizes=(1e8, 1e9)))


# ---------------------------------------------------------------- parameter counts

def test_parameter_counts():
    assert [bundled_param_count(s) for s in ("tiny", "small", "base")] == [85_504, 761_344, 4_538_368]
    assert param_count("bundled:small")[0] == 761_344
    assert param_count("mistralai/Mistral-7B-v0.1") == (7e9, "the model's name (7B)")
    assert param_count("HuggingFaceTB/SmolLM2-135M")[0] == 135e6
    assert param_count("org/model", estimate_billion=7.24)[0] == pytest.approx(7.24e9)
    assert param_count("mistralai/Mixtral-8x7B-v0.1")[0] is None


def test_parameter_count_of_a_local_model(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, '
                                          '"num_attention_heads": 4, "vocab_size": 51, "tie_word_embeddings": true}')
    assert param_count(str(tmp_path)) == (85_504, f"{tmp_path / 'config.json'} (exact)")


# ---------------------------------------------------------------- finished search directories

def ladder_dirs(tmp_path: Path, sizes=("tiny", "small", "base"), n: int = 8, **changes) -> list[Path]:
    """Finished searches of the bundled ladder, lr = c N^-0.5 inside the cpu range."""
    rng = np.random.default_rng(1)
    out = []
    for size in sizes:
        t = trials_table(bundled_param_count(size), n, rng, c=0.8)
        t = t.assign(beta=t["beta"].clip(2, 10), rank=rank_column(t, "max"))
        out.append(write_search(tmp_path / f"cpu-{size}", t, model_name_or_path=f"bundled:{size}",
                                **{"num_samples": n, "state": "finished", **changes}))
    return out


def test_load_finished_ladder(tmp_path):
    dirs = ladder_dirs(tmp_path)
    searches = finished.load_finished([tmp_path])  # a folder of searches
    assert [s.label for s in searches] == ["cpu/base", "cpu/small", "cpu/tiny"]
    assert [s.n_params for s in searches] == [4_538_368, 761_344, 85_504]
    assert {s.objective for s in searches} == {"eval/success_rate"} and searches[0].mode == "max"
    assert {"trial_id", "status", "best_objective", "learning_rate"} <= set(searches[0].trials.columns)
    assert len(searches[0].trials) == 8 and len(finished.load_finished(dirs + dirs)) == 3  # each once
    trend = transfer.fit_trends(searches)["learning_rate"]
    assert trend.slope == pytest.approx(EXPONENT, abs=0.15)
    base = searches[0]
    lr_lo, lr_hi = guide.documented_range("learning_rate", "cpu")
    assert lr_lo <= transfer.predict_point(transfer.fit_trends(searches[1:]), base.n_params, "cpu")["learning_rate"] <= lr_hi


@pytest.mark.parametrize("change, needle", [
    ({"state": "interrupted"}, "not a finished search (search.json: state interrupted)"),
    ({"state": "running"}, "not a finished search (search.json: state running)"),
])
def test_a_search_that_did_not_finish_is_refused(tmp_path, change, needle):
    d = ladder_dirs(tmp_path, sizes=("tiny",), **change)[0]
    with pytest.raises(UserError) as info:
        finished.load_finished([d])
    assert str(info.value).startswith(f"{d}: ") and needle in str(info.value) and "\n" not in str(info.value)


def test_bad_directories_and_mixed_objectives(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a finished search .no search.json"):
        finished.load_finished([tmp_path / "empty"])
    with pytest.raises(UserError, match="no such directory"):
        finished.load_finished([tmp_path / "nope"])
    a = ladder_dirs(tmp_path / "a", sizes=("tiny",))[0]
    b = ladder_dirs(tmp_path / "b", sizes=("small",), objective="eval/preference_accuracy")[0]
    with pytest.raises(UserError, match=r"^mixed objectives across searches \(cpu-tiny: eval/success_rate"):
        finished.load_finished([a, b])
    (a / "trials.csv").unlink()
    with pytest.raises(UserError, match="trials.csv missing"):
        finished.load_finished([a])


# ---------------------------------------------------------------- the same size: a warm start

def test_same_size_trials_for_the_searcher(tmp_path):
    import yaml

    from simpo_ray.search.plan import load

    dirs = ladder_dirs(tmp_path)
    copy = write_search(tmp_path / "copy", pd.read_csv(dirs[0] / "trials.csv", dtype={"trial_id": str}),
                        model_name_or_path="bundled:tiny", num_samples=8, state="finished")
    searches = finished.load_finished(dirs + [copy])
    space = load(TINY_SPACE)
    notes: list[str] = []
    warm = finished.same_size_trials(searches, space, notes)
    tiny = pd.read_csv(dirs[0] / "trials.csv").sort_values("rank")
    assert len(warm) == 8 and notes == ["warm start: 8 trial(s) left out: repeated an earlier point"]
    assert warm[0][0] == pytest.approx({p: tiny.iloc[0][p] for p in space.params})
    assert warm[0][1] == tiny.iloc[0]["objective_value"]  # what the searcher was told
    # A space that fixes sft_weight takes only trials that ran with that value (here none).
    raw = yaml.safe_load(TINY_SPACE.read_text())
    del raw["params"]["sft_weight"]
    raw["base"]["sft_weight"] = 0.5
    notes = []
    assert finished.same_size_trials(searches, load(raw), notes) == []
    assert "another value of a parameter this space fixes" in notes[0]
    other = load(raw | {"search": {**raw["search"], "objective": "eval/loss", "mode": "min"}})
    with pytest.raises(UserError, match="optimised eval/success_rate .max., this search eval/loss"):
        finished.same_size_trials(searches, other)
    # Values measured otherwise (here: shorter answers allowed) must not reach the searcher.
    shorter = load(TINY_SPACE, overrides={"base.max_new_tokens": 4})
    with pytest.raises(UserError, match=r"ran with max_new_tokens: None, this search with 4; .* not comparable"):
        finished.same_size_trials(searches, shorter)


def test_describe_for_the_dry_run(tmp_path):
    from simpo_ray.search.plan import load

    searches = finished.load_finished(ladder_dirs(tmp_path, sizes=("tiny", "small")))
    text = transfer.describe(searches, load(TINY_SPACE.with_name("cpu-base.yaml")))
    assert text[0].startswith("warm start: 0 finished trial(s) of cpu/base")
    assert any("log10 learning_rate = " in line and "cpu/tiny 85.5K (n=5, spread" in line for line in text)
    point = [line for line in text if line.strip().startswith("learning_rate ")]
    # two sizes: a centre, and no interval claimed
    assert len(point) == 1 and point[0].endswith("(no interval: 2 sizes)")
    assert "  no interval from 2 sizes (one optimum each leaves 0 degrees of freedom between sizes; a third size " \
           "gives one)" in text
    one = transfer.describe(searches[:1], load(TINY_SPACE))
    assert one[0].startswith("warm start: 8 finished trial(s) of cpu/tiny")
    assert one[-1].startswith("trend across sizes: not fitted: cannot extrapolate from one model size")


# ---------------------------------------------------------------- the analysis section

def test_analysis_predicts_unseen_sizes(tmp_path):
    from analysis import extrapolate
    from analysis.load import load_results

    two = load_results(ladder_dirs(tmp_path / "two", sizes=("tiny", "small")))
    tables = extrapolate.tables(two)
    pred = tables["extrapolated"]
    assert set(pred["size"]) == {"cpu/base", "1b-3b/Llama-3.2-3B-Instruct", "7b-8b/Mistral-7B-v0.1",
                                 "8b-13b/Meta-Llama-3-8B-Instruct", "13b-30b/Qwen2.5-14B-Instruct",
                                 "70b+/Llama-3.1-70B-Instruct"}
    for row in pred.itertuples():
        lo, hi = guide.documented_range(row.parameter, row.size.split("/")[0])
        assert lo <= row.low <= row.predicted <= row.high <= hi
    text = "\n".join(extrapolate.markdown(tables))
    assert "## Predicted for unseen sizes (extrapolated)" in text and "EXTRAPOLATED" in text
    assert "needs searches of at least three sizes" in text
    three = load_results(ladder_dirs(tmp_path / "three"))
    tables = extrapolate.tables(three)
    assert "cpu/base" not in set(tables["extrapolated"]["size"])
    assert len(tables["leave_one_size_out"]) == 3 * 4
    assert "inside interval" in "\n".join(extrapolate.markdown(tables))
    assert extrapolate.tables(load_results(ladder_dirs(tmp_path / "one", sizes=("tiny",)))) == {}


# ---------------------------------------------------------------- the warm start wired into the search

# The guide's documented starting point for the `cpu` bucket, written out (as tests/test_tune.py).
CPU_DEFAULT = {"learning_rate": 1e-3, "beta": 2.0, "gamma_beta_ratio": 0.5, "sft_weight": 0.0}
EXTRA = {"learning_rate": 2e-3, "beta": 3.0, "gamma_beta_ratio": 0.45, "sft_weight": 0.05}


def tiny_search_with_known_points(tmp_path: Path) -> Path:
    """A finished cpu-tiny search whose trials include the documented default, the EXTRA point
    and a diverged trial (which ranks nowhere and is not handed over)."""
    [d] = ladder_dirs(tmp_path, sizes=("tiny",))
    t = pd.read_csv(d / "trials.csv", dtype={"trial_id": str})
    for i, point in ((0, CPU_DEFAULT), (1, EXTRA)):
        for p, v in point.items():
            t.loc[i, p] = v
    t.loc[2, ["status", "best_objective", "objective_value"]] = ["diverged", 0.95, 0.0]
    t.assign(rank=rank_column(t, "max")).to_csv(d / "trials.csv", index=False)
    return d


def test_warm_start_gives_the_searcher_completed_trials_and_the_default_still_runs_first(tmp_path):
    import optuna

    from simpo_ray.search.searcher import make_searcher
    from simpo_ray.search.plan import load

    d = tiny_search_with_known_points(tmp_path)
    space = load(TINY_SPACE, warm_start=[str(d)], overrides={"search.points_to_evaluate": {"extra": [EXTRA]}})
    # Expected from trials.csv with plain pandas: the completed trials, each with its final value.
    t = pd.read_csv(d / "trials.csv", dtype={"trial_id": str})
    done = t[t["status"] == "completed"]
    expected = {tuple(round(r[p], 12) for p in space.params): r["objective_value"] for _, r in done.iterrows()}
    assert len(expected) == len(t) - 1

    searcher = make_searcher(space)
    study = searcher._ot_study
    complete = [x for x in study.trials if x.state == optuna.trial.TrialState.COMPLETE]
    assert {tuple(round(x.params[p], 12) for p in space.params): x.value for x in complete} == expected
    # The EXTRA point was evaluated by a warm trial: dropped; the default runs first all the same.
    assert space.points_to_evaluate[0] == CPU_DEFAULT and EXTRA not in space.points_to_evaluate
    assert any("extra point 1" in line and "dropped" in line for line in space.warm.lines)
    assert any(line.startswith("guide default") and "still runs first" in line for line in space.warm.lines)

    n = space.search.num_samples
    searcher.set_search_properties(None, None, {})
    got = [searcher.suggest(f"t{i}") for i in range(n)]
    assert got[0] == pytest.approx(CPU_DEFAULT)
    assert got[:len(space.points_to_evaluate)] == [pytest.approx(p) for p in space.points_to_evaluate]
    warm = [dict(zip(space.params, k)) for k in expected]
    for s in got[1:]:  # no warm trial is proposed again (the default is the search's own baseline)
        assert not any(all(math.isclose(s[p], w[p], rel_tol=1e-9) for p in w) for w in warm), s
    assert len(study.trials) == len(expected) + n


def test_warm_start_dry_run_predicts_inside_the_documented_range(tmp_path, capsys, monkeypatch):
    """Two searched sizes: a centre per parameter inside the documented range, enqueued after the
    default (`search.warm_start_points: trend`), and no interval (0 degrees of freedom between
    sizes), so --warm-start-narrow is refused."""
    import yaml

    from simpo_ray.cli import tune_main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    dirs = ladder_dirs(tmp_path, sizes=("tiny", "small"))
    raw = yaml.safe_load(TINY_SPACE.with_name("cpu-base.yaml").read_text())
    raw["search"]["warm_start_points"] = "trend"
    base = tmp_path / "cpu-base-trend.yaml"
    base.write_text(yaml.safe_dump(raw))
    assert tune_main(["--space", str(base), "--dry-run", "--warm-start", *map(str, dirs)]) == 0
    out = capsys.readouterr().out.splitlines()
    [start] = [i for i, line in enumerate(out) if line.startswith("predicted point for cpu/base")]
    predicted = {}
    for line in out[start + 1:start + 5]:
        p, centre = line.split()[:2]
        predicted[p] = float(centre)
        assert line.endswith("(no interval: 2 sizes)"), line
    assert set(predicted) == set(guide.PARAMS)
    for p, centre in predicted.items():
        lo, hi = guide.documented_range(p, "cpu")
        assert lo <= centre <= hi, (p, centre)
    assert any("log10 learning_rate = " in line and "cpu/small 761K (n=5, spread" in line for line in out)
    # The predicted point runs right after the documented default.
    points = [line for line in out if line.startswith(("  1. ", "  2. "))]
    assert "guide default" in points[0] and "transferred from sizes cpu/tiny, cpu/small" in points[1]
    enqueued = dict(kv.split("=") for kv in points[1].split("<-")[0].split()[1:])
    assert {p: float(v) for p, v in enqueued.items()} == pytest.approx(predicted, rel=1e-2, abs=1e-3)
    assert tune_main(["--space", str(base), "--dry-run", "--warm-start", *map(str, dirs),
                      "--warm-start-narrow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: search.warm_start_narrow: the size trends have no interval to "
                          "narrow to: no interval from 2 sizes") and "\n" not in err, err


def test_warm_start_top_k_enqueues_the_nearest_sizes_best_trials_in_rank_order(tmp_path):
    """`search.warm_start_points: top_k`: after the default, the k best trials of the finished
    size nearest the target (small, not tiny, for base), in the order plain pandas ranks them
    (completed or stopped early, best `best_objective` first); the trend's point is not enqueued."""
    from simpo_ray.search.plan import load

    dirs = ladder_dirs(tmp_path, sizes=("tiny", "small"))
    base = TINY_SPACE.with_name("cpu-base.yaml")
    space = load(base, warm_start=[str(d) for d in dirs],
                 overrides={"search.warm_start_points": "top_k", "search.warm_start_top_k": 2})
    small = next(d for d in dirs if "small" in d.name)
    t = pd.read_csv(small / "trials.csv", dtype={"trial_id": str})
    t = t[t["status"].isin(["completed", "stopped_early"])].sort_values("best_objective", ascending=False)
    expected = [{p: float(r[p]) for p in guide.PARAMS} for _, r in t.head(2).iterrows()]
    assert space.points_to_evaluate[0] == pytest.approx(space.documented_default())
    assert space.points_to_evaluate[1:3] == [pytest.approx(e) for e in expected]
    assert [label.split(" (")[0] for label in space.point_labels[1:3]] == ["top 1 of cpu/small", "top 2 of cpu/small"]
    assert not any(label.startswith("transferred from") for label in space.point_labels)
    assert any("not enqueued (search.warm_start_points: top_k)" in line for line in space.warm.lines)
    none = load(base, warm_start=[str(d) for d in dirs], overrides={"search.warm_start_points": "none"})
    assert len(none.points_to_evaluate) == 1
    default = load(base, warm_start=[str(d) for d in dirs])  # top_k, 3, unless told otherwise
    assert [label.split(" (")[0] for label in default.point_labels[1:]] == [
        "top 1 of cpu/small", "top 2 of cpu/small", "top 3 of cpu/small"]


def test_warm_start_top_k_pools_the_searches_of_the_nearest_size(tmp_path):
    """Two finished searches of small (different trials): the top k are the best of both
    together, in the order plain pandas ranks their concatenated tables."""
    from simpo_ray.search.plan import load

    dirs = ladder_dirs(tmp_path / "a", sizes=("tiny", "small"))
    rng = np.random.default_rng(5)
    t = trials_table(bundled_param_count("small"), 8, rng, c=0.8)
    t = t.assign(beta=t["beta"].clip(2, 10))
    dirs.append(write_search(tmp_path / "b" / "cpu-small-again", t.assign(rank=rank_column(t, "max")),
                             model_name_or_path="bundled:small", num_samples=8, state="finished"))
    space = load(TINY_SPACE.with_name("cpu-base.yaml"), warm_start=[str(d) for d in dirs],
                 overrides={"search.warm_start_top_k": 4})
    both = pd.concat([pd.read_csv(d / "trials.csv").assign(src=d.name) for d in dirs if "small" in d.name],
                     ignore_index=True)
    both = both[both["status"].isin(["completed", "stopped_early"])].sort_values("best_objective", ascending=False)
    assert set(both.head(4)["src"]) == {"cpu-small", "cpu-small-again"}  # the top 4 draw on both
    assert space.points_to_evaluate[1:5] == [pytest.approx({p: float(r[p]) for p in guide.PARAMS})
                                              for _, r in both.head(4).iterrows()]
    assert any("cpu/small" in line and "2 searches pooled" in line for line in space.warm.lines)


def test_warm_start_is_recorded_and_older_records_still_compare(tmp_path):
    from simpo_ray.search.records import resolved_space, space_differences
    from simpo_ray.search.plan import load
    from simpo_ray.search.run import _resume_command

    dirs = ladder_dirs(tmp_path, sizes=("tiny", "small"))
    base = TINY_SPACE.with_name("cpu-base.yaml")
    warm = load(base, warm_start=[str(tmp_path)])
    record = SearchRecord.from_space(warm, base, "warm")
    assert record.search["warm_start"] == [str(tmp_path.resolve())]
    assert [(s["name"], s["same_size"], s["in_trend"]) for s in record.search["warm_started_from"]] == [
        ("cpu-small", False, True), ("cpu-tiny", False, True)]
    assert SearchRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    # A cold space resolves as a record written before warm starts existed: no new keys.
    cold = resolved_space(load(base))
    assert "warm_start" not in cold["search"] and "warm_start_narrow" not in cold["search"]
    assert space_differences(cold, resolved_space(warm)) != []
    # warm_start_top_k is read only under warm_start_points top_k (the default), so it differs only there
    trend3, trend5 = (load(base, warm_start=[str(tmp_path)], overrides={"search.warm_start_points": "trend",
                                                                         "search.warm_start_top_k": k}) for k in (3, 5))
    assert space_differences(resolved_space(trend3), resolved_space(trend5)) == []
    k5 = load(base, warm_start=[str(tmp_path)], overrides={"search.warm_start_top_k": 5})
    diffs = space_differences(resolved_space(warm), resolved_space(k5))
    assert "search.warm_start_top_k: '<unset>' -> 5" in diffs  # (3, the default, is written as absent)
    cmd = _resume_command(str(base), None, "warm", None, {"warm_start": [str(d) for d in dirs]})
    assert f"--warm-start {dirs[0]} {dirs[1]} --resume" in cmd


@pytest.mark.parametrize("search, needle", [
    ({"warm_start": [3]}, "search.warm_start[0]: expected a non-empty string, got 3"),
    ({"warm_start_narrow": "yes"}, "search.warm_start_narrow: expected true or false, got 'yes'"),
    ({"warm_start_narrow": True}, "search.warm_start_narrow: true needs finished searches"),
    ({"warm_start_points": "top_k"}, "search.warm_start_points: 'top_k' needs finished searches"),
    ({"warm_start_points": "best"}, "search.warm_start_points: 'best' is not allowed"),
    ({"warm_start_top_k": 0}, "search.warm_start_top_k: 0"),
    ({"warm_start": ["no/such/dir"]}, "no/such/dir: no such directory"),
])
def test_warm_start_settings_are_validated(search, needle):
    import yaml

    from simpo_ray.search.plan import load

    raw = yaml.safe_load(TINY_SPACE.read_text())
    with pytest.raises(UserError) as info:
        load(raw | {"search": {**raw["search"], **search}})
    assert needle in str(info.value) and "\n" not in str(info.value)
