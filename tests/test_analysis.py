"""analysis/ on real searches: tables checked against trials.csv read with plain pandas.

The session fixture runs two small real searches (bundled task, models `bundled:tiny` and
`bundled:small`, 6 trials each, short step budgets) through `simpo_ray.tune.run_search` and
runs `python -m analysis` on them once; the tests read what it wrote. Set
SIMPO_RAY_TEST_RESULTS to a folder of finished searches to reuse them instead of searching.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ("learning_rate", "beta", "gamma_beta_ratio", "sft_weight")
FINISHED = ("completed", "stopped_early")
SIZES = ("tiny", "small")
NUM_SAMPLES = 6
# Short budgets: 12 steps, a report every 3, ASHA rungs at 3, 6 and the end.
OVERRIDES = {
    "base.max_steps": 12, "base.eval_steps": 3, "base.logging_steps": 3,
    "base.max_eval_samples": 32, "base.generation_eval_samples": 8,
    "search.time_attr": "step", "search.grace_period": 3, "search.reduction_factor": 2,
    "search.max_t": 12,
}
PLOTS = ("objective_vs_params", "learning_curves", "parallel_top_trials", "accuracy_vs_nll")


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def storage(tmp_path_factory) -> Path:
    """A folder holding one finished search per size of the bundled CPU ladder."""
    reuse = os.environ.get("SIMPO_RAY_TEST_RESULTS")
    if reuse:
        return Path(reuse)
    try:
        from simpo_ray.tune import run_search
    except ImportError as e:
        pytest.skip(f"simpo_ray.tune.run_search is not importable ({e}); cannot run the real searches")
    storage = tmp_path_factory.mktemp("searches")
    for size in SIZES:
        space = ROOT / "search_spaces" / f"cpu-{size}.yaml"
        if not space.is_file():
            pytest.skip(f"{space} is missing; the CPU ladder's search spaces are needed")
        run_search(space, storage_path=str(storage), name=f"cpu-{size}", num_samples=NUM_SAMPLES, seed=0,
                   overrides=OVERRIDES, verbose=0)
    return storage


@pytest.fixture(scope="session")
def searches(storage) -> dict[str, Path]:
    """size key -> experiment directory, derived from each search's own files."""
    out = {}
    for d in sorted(p for p in storage.iterdir() if (p / "trials.csv").is_file()):
        search = json.loads((d / "search.json").read_text())
        model = (yaml.safe_load((d / "best_config.yaml").read_text()) or {})["model_name_or_path"]
        out[f"{search['size_bucket']}/{model.split(':')[-1].split('/')[-1]}"] = d
    assert len(out) >= 2, f"expected searches of at least two sizes in {storage}"
    return out


@pytest.fixture(scope="session")
def analysed(storage, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analysis") / "out"
    r = run_cli(storage, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def expected(d: Path) -> dict:
    """Best trial, top trials and counts computed from trials.csv with plain pandas."""
    search = json.loads((d / "search.json").read_text())
    t = pd.read_csv(d / "trials.csv", dtype={"trial_id": str})
    # The score: the objective's last reported value.
    last = t["objective_value"] if "objective_value" in t else pd.Series(float("nan"), index=t.index)
    t["score"] = last.fillna(t[f"final_{search['objective']}"])
    fin = t[t["status"].isin(FINISHED) & t["score"].notna()]
    fin = fin.sort_values(["score", "steps"], ascending=[search["mode"] == "min", False], kind="stable")
    k = min(len(fin), max(3, math.ceil(len(fin) / 4)))
    return {"trials": t, "best": fin.iloc[0], "top": fin.head(k), "n_finished": len(fin),
            "counts": t["status"].value_counts().to_dict(), "mode": search["mode"],
            "objective": search["objective"]}


# ---------------------------------------------------------------- tables against trials.csv

@pytest.mark.slow
def test_best_trial_and_robust_range(analysed, searches):
    rec = pd.read_csv(analysed / "recommendations.csv")
    for size, d in searches.items():
        e = expected(d)
        r = rec[rec["size"] == size].set_index("parameter")
        assert list(r.index) == list(PARAMS)
        for p in PARAMS:
            assert r.at[p, "recommended"] == pytest.approx(e["best"][p], rel=1e-9)
            assert r.at[p, "robust_low"] == pytest.approx(e["top"][p].min(), rel=1e-9)
            assert r.at[p, "robust_high"] == pytest.approx(e["top"][p].max(), rel=1e-9)
            assert r.at[p, "support"] == len(e["top"])
            assert r.at[p, "n_finished"] == e["n_finished"]


@pytest.mark.slow
def test_guide_columns_and_flags(analysed, searches):
    from simpo_ray import guide

    rec = pd.read_csv(analysed / "recommendations.csv", keep_default_na=False)
    for size, d in searches.items():
        s = json.loads((d / "search.json").read_text())
        default = guide.documented_default(s["size_bucket"], s.get("model_type"), s.get("task"))
        for _, row in rec[rec["size"] == size].iterrows():
            p = row["parameter"]
            lo, hi = guide.recommended_range(p, s["size_bucket"], s.get("task"), s.get("model_type"))
            assert float(row["guide_default"]) == pytest.approx(default[p])
            assert (float(row["guide_low"]), float(row["guide_high"])) == pytest.approx((lo, hi))
            v = float(row["recommended"])
            dlo, dhi = guide.documented_range(p, s["size_bucket"], s.get("task"), s.get("model_type"))
            if v > dhi or v < dlo:
                assert row["flag"].startswith(f"{'above' if v > dhi else 'below'} documented range")
            elif v > hi or v < lo:
                assert row["flag"].startswith(f"{'above' if v > hi else 'below'} guide")
            else:
                assert row["flag"] == ""


@pytest.mark.slow
def test_best_against_documented_default(analysed, searches):
    bvd = pd.read_csv(analysed / "best_vs_default.csv", dtype={"best_trial": str, "default_trial": str})
    for size, d in searches.items():
        e = expected(d)
        row = bvd[bvd["size"] == size].iloc[0]
        assert row["best_trial"] == e["best"]["trial_id"]
        assert row["best_score"] == pytest.approx(e["best"]["score"])
        default = e["trials"][e["trials"]["is_default"].astype(str).str.lower() == "true"]
        assert len(default) == 1, "the search evaluates the documented default first"
        assert row["default_trial"] == default["trial_id"].iloc[0]
        if pd.notna(default["score"].iloc[0]):
            sign = 1 if e["mode"] == "max" else -1
            assert row["improvement"] == pytest.approx(sign * (e["best"]["score"] - default["score"].iloc[0]))
            assert row["improvement"] >= 0 or default["status"].iloc[0] not in FINISHED


@pytest.mark.slow
def test_status_counts(analysed, searches):
    counts = pd.read_csv(analysed / "status_counts.csv").set_index("size")
    for size, d in searches.items():
        e = expected(d)
        for status in ("completed", "stopped_early", "diverged", "errored"):
            assert counts.at[size, status] == e["counts"].get(status, 0)
        assert counts.at[size, "total"] == len(e["trials"])
        if not os.environ.get("SIMPO_RAY_TEST_RESULTS"):
            assert len(e["trials"]) == NUM_SAMPLES


@pytest.mark.slow
def test_cross_size_table_orders_the_ladder(analysed, searches):
    cs = pd.read_csv(analysed / "cross_size.csv")
    ladder = [s for s in ("cpu/tiny", "cpu/small", "cpu/base") if s in searches]
    assert list(cs["size"]) == ladder
    for size, d in searches.items():
        row = cs[cs["size"] == size].iloc[0]
        best = expected(d)["best"]
        for p in PARAMS:
            assert row[p] == pytest.approx(best[p])
            assert f"{p} guide" in cs.columns
    md = (analysed / "recommendations.md").read_text()
    assert "## Across sizes" in md
    for size in searches:
        assert f"## {size}" in md


@pytest.mark.slow
def test_importance_per_size(analysed, searches):
    imp = pd.read_csv(analysed / "importance.csv")
    md = (analysed / "recommendations.md").read_text()
    for size, d in searches.items():
        i = imp[imp["size"] == size]
        if len(i):  # fANOVA importances are shares of the variance
            assert i["importance"].sum() == pytest.approx(1.0, abs=1e-6)
            assert set(i["parameter"]) <= set(PARAMS)
            assert (i["n_trials"] == expected(d)["n_finished"]).all()
        else:
            section = md.split(f"## {size}")[1].split("\n## ")[0]
            assert "not computed" in section


@pytest.mark.slow
def test_rung_metrics_match_curves(searches):
    from analysis import load_results

    d = next(iter(searches.values()))
    results = load_results([d])
    curves = pd.read_csv(d / "curves.csv", dtype={"trial_id": str})
    objective = results.objective
    rung = results.rungs[results.experiments[0].name][0]
    for _, t in results.trials.iterrows():
        c = curves[(curves["trial_id"] == t["trial_id"]) & (curves["step"] >= rung)].sort_values("step")
        if len(c) and pd.notna(c[objective].iloc[0]):
            assert t[f"{objective}@{rung}"] == pytest.approx(c[objective].iloc[0])
    assert set(results.curves["trial_id"]) <= set(results.trials["trial_id"])


@pytest.mark.slow
def test_diagnostics_count_diverged_trials(analysed, searches):
    flags = pd.read_csv(analysed / "diagnostics_trials.csv", dtype={"trial_id": str})
    diag = pd.read_csv(analysed / "diagnostics.csv")
    for size, d in searches.items():
        n_div = expected(d)["counts"].get("diverged", 0)
        assert flags[(flags["size"] == size) & flags["diverged"]].shape[0] >= n_div
        row = diag[(diag["size"] == size) & (diag["check"] == "diverged")]
        if n_div:
            assert row["n_trials"].iloc[0] >= n_div and "reduce learning_rate" in row["advice"].iloc[0]
    for _, r in diag.iterrows():
        assert r["advice"].startswith("guide:")


@pytest.mark.slow
def test_plots_are_readable_pngs(analysed, searches):
    from PIL import Image

    paths = [analysed / "plots" / f"{size.replace('/', '-')}_{name}.png" for size in searches for name in PLOTS]
    paths.append(analysed / "plots" / "cross_size.png")
    md = (analysed / "recommendations.md").read_text()
    for path in paths:
        assert f"(plots/{path.name})" in md
        assert path.is_file() and path.stat().st_size > 5000, path
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
            assert len(set(im.convert("L").getdata())) > 10  # something is drawn


@pytest.mark.slow
def test_best_configs_validate_and_hold_the_best_trial(analysed, searches):
    from simpo_ray.config import load_train_config

    for size, d in searches.items():
        cfg = load_train_config(analysed / "configs" / f"{size.replace('/', '-')}.yaml")
        best = expected(d)["best"]
        for p in PARAMS:
            assert getattr(cfg, p) == pytest.approx(best[p])
        source = yaml.safe_load((d / "best_config.yaml").read_text())
        assert cfg.model_name_or_path == source["model_name_or_path"]


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(storage, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SIMPO_RAY_RESULTS", str(storage))
    nb = nbformat.read(ROOT / "analysis" / "trials.ipynb", as_version=4)
    assert "RESULT_DIR" in nb.cells[0].source
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "analysis")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3 * 2


# ---------------------------------------------------------------- bad input

def assert_clean_failure(r: subprocess.CompletedProcess, out: Path, needle: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_directory(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_cli(tmp_path / "nope", "--out", out), out, "no such directory")


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_clean_failure(run_cli(tmp_path / "empty", "--out", out), out, "empty")


def test_directory_of_another_tool(tmp_path):
    other = tmp_path / "ray_results" / "train_fn_2026"
    other.mkdir(parents=True)
    (other / "experiment_state-2026.json").write_text("{}")
    (other / "progress.csv").write_text("a,b\n1,2\n")
    out = tmp_path / "out"
    assert_clean_failure(run_cli(tmp_path / "ray_results", "--out", out), out, "not a simpo_ray result directory")
    assert_clean_failure(run_cli(other, "--out", out), out, "not a simpo_ray result directory")


@pytest.mark.slow
def test_search_without_finished_trial(searches, tmp_path):
    d = shutil.copytree(next(iter(searches.values())), tmp_path / "failed")
    t = pd.read_csv(d / "trials.csv", dtype={"trial_id": str})
    t["status"] = ["diverged" if i % 2 else "errored" for i in range(len(t))]
    t.to_csv(d / "trials.csv", index=False)
    out = tmp_path / "out"
    assert_clean_failure(run_cli(d, "--out", out), out, "no finished trial")


@pytest.mark.slow
def test_mixed_objectives(searches, tmp_path):
    a, b = (shutil.copytree(d, tmp_path / d.name) for d in list(searches.values())[:2])
    s = json.loads((b / "search.json").read_text())
    s.update(objective="eval/loss", mode="min")
    (b / "search.json").write_text(json.dumps(s))
    out = tmp_path / "out"
    assert_clean_failure(run_cli(a, b, "--out", out), out, "mixed objectives")


def test_failure_leaves_existing_out_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "recommendations.md").write_text("previous analysis\n")
    r = run_cli(tmp_path / "nope", "--out", out)
    assert r.returncode == 2 and r.stderr.startswith("error: ")
    assert sorted(p.name for p in out.iterdir()) == ["recommendations.md"]
    assert (out / "recommendations.md").read_text() == "previous analysis\n"


# ---------------------------------------------------------------- pure helpers

def test_pareto_front_hand_computed():
    from analysis.plots import pareto_front

    pts = pd.DataFrame({"nll": [1.0, 1.2, 0.9, 1.5, 1.1], "acc": [0.70, 0.80, 0.60, 0.79, 0.70]})
    front = pareto_front(pts, "nll", "acc")
    # (0.9, .60) best NLL; (1.0, .70) better acc; (1.1, .70) dominated; (1.2, .80) best acc; (1.5, .79) dominated
    assert list(front.index) == [2, 0, 1]


def test_top_k_is_top_quartile_with_at_least_three():
    from analysis.report import top_k

    assert [top_k(n) for n in (1, 2, 3, 6, 12, 13, 40)] == [1, 2, 3, 3, 3, 4, 10]
