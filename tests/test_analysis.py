"""analysis/ on real searches: tables checked against trials.csv read with plain pandas.

The session fixture runs two small real searches (bundled task, models `bundled:tiny` and
`bundled:small`, 4 trials each, short step budgets) through `simpo_ray.search.run.run_search` and
runs `python -m analysis` on them once; the tests read what it wrote. Set
SIMPO_RAY_TEST_RESULTS to a folder of finished searches to reuse them instead of searching.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ("learning_rate", "beta", "gamma_beta_ratio", "sft_weight")
FINISHED = ("completed", "stopped_early")
TINY_SPACE = ROOT / "search_spaces" / "cpu-tiny.yaml"
SIZES = ("tiny", "small")
NUM_SAMPLES = 4  # more trials than the 2 slots: ASHA cuts some; 4 keep the suite's time
# Short budgets: 12 steps, a report every 3, ASHA rungs at 3, 6 and the end.
OVERRIDES = {
    "base.max_steps": 12, "base.eval_steps": 3, "base.logging_steps": 3,
    "base.max_eval_samples": 32, "base.generation_eval_samples": 8,
    "search.time_attr": "step", "search.grace_period": 3, "search.reduction_factor": 2,
    "search.max_t": 12, "base.report_to": ["mlflow"],
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
        from simpo_ray.search.run import run_search
    except ImportError as e:
        pytest.skip(f"simpo_ray.search.run.run_search is not importable ({e}); cannot run the real searches")
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
    # The score: the best objective over the run; ties: better final value, longer run, trial id.
    t["score"] = t["best_objective"]
    fin = t[t["status"].isin(FINISHED) & t["score"].notna()]
    lower = search["mode"] == "min"
    fin = fin.sort_values(["score", "objective_value", "steps", "trial_id"],
                          ascending=[lower, lower, False, True], kind="stable", na_position="last")
    k = min(len(fin), max(3, math.ceil(len(fin) / 4)))
    return {"trials": t, "best": fin.iloc[0], "top": fin.head(k), "n_finished": len(fin),
            "order": list(fin.index),
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
def test_the_search_and_the_analysis_name_the_same_best_trial(analysed, searches):
    """trials.csv's rank column, best_config.yaml and analysis's best trial: one ranking."""
    bvd = pd.read_csv(analysed / "best_vs_default.csv", dtype={"best_trial": str})
    for size, d in searches.items():
        e = expected(d)
        ranks = e["trials"].dropna(subset=["rank"]).sort_values("rank")
        assert list(ranks["rank"]) == list(range(1, e["n_finished"] + 1))
        e_ids = list(e["trials"].loc[e["order"], "trial_id"])
        assert list(ranks["trial_id"]) == e_ids
        assert bvd[bvd["size"] == size]["best_trial"].iloc[0] == e["best"]["trial_id"] == e_ids[0]
        header = (d / "best_config.yaml").read_text().splitlines()[0]
        assert f"trial {e['best']['trial_id']}," in header


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


# ---------------------------------------------------------------- the tools users open

STATE_OF = {"completed": "COMPLETE", "stopped_early": "PRUNED", "diverged": "COMPLETE", "errored": "FAIL"}
# Not metrics of the run: keys, and Tune's own timing fields (its loggers leave time_total_s out).
CURVE_KEYS = ("trial_id", "step", "status", "checkpoint_path", "time_total_s", "time_since_restore",
              "iterations_since_restore")


def _study(d: Path):
    import optuna

    recorded = json.loads((d / "search.json").read_text())["search"]["optuna_study"]
    return optuna.load_study(study_name=recorded["name"], storage=recorded["storage"]), recorded


def _numeric_curves(d: Path) -> pd.DataFrame:
    curves = pd.read_csv(d / "curves.csv", dtype={"trial_id": str})
    keep = [c for c in curves.columns if c not in CURVE_KEYS and pd.api.types.is_numeric_dtype(curves[c])]
    return curves, keep


@pytest.mark.slow
def test_the_optuna_study_opens_with_optunas_own_functions_and_matches_the_tables(searches):
    """optuna.load_study on the storage search.json names: one Optuna trial per trials.csv row
    (joined by the `trial_id` user attribute), with its parameters, its state, its final value
    and the objective of every report at curves.csv's steps; importance and plots run on it."""
    import optuna

    for d in searches.values():
        study, recorded = _study(d)
        assert recorded["storage"] == f"sqlite:///{d / 'optuna.db'}"
        trials = pd.read_csv(d / "trials.csv", dtype={"trial_id": str}).set_index("trial_id")
        curves = pd.read_csv(d / "curves.csv", dtype={"trial_id": str})
        objective = json.loads((d / "search.json").read_text())["objective"]
        got = {t.user_attrs["trial_id"]: t for t in study.trials}
        assert set(got) == set(trials.index) and len(study.trials) == len(trials)
        assert {"COMPLETE", "PRUNED"} <= {t.state.name for t in study.trials} or len(trials) < 3
        for tid, t in got.items():
            row = trials.loc[tid]
            assert t.state.name == STATE_OF[row["status"]], tid
            for k in PARAMS:
                assert t.params[k] == pytest.approx(row[k], rel=1e-9)
            reports = curves[curves["trial_id"] == tid].dropna(subset=[objective])
            assert t.intermediate_values == pytest.approx(dict(zip(reports["step"].astype(int), reports[objective])))
            assert t.value == pytest.approx(reports[objective].iloc[-1])  # the last report's
        importances = optuna.importance.get_param_importances(study)
        assert set(importances) == set(PARAMS)
        assert optuna.visualization.plot_optimization_history(study).data
        assert optuna.visualization.plot_intermediate_values(study).data


@pytest.mark.slow
def test_optuna_dashboard_shows_the_searchs_trials_in_a_browser(searches, tmp_path):
    """The optuna-dashboard package serves the study and headless Chromium renders its trial
    list: the trial count, each trial's state, and the Tune id of the best trial."""
    import socket
    import urllib.request

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium): the dashboard's page is not loaded")
    assert dashboard.exists(), "optuna-dashboard (a dev dependency) is not installed"
    d = next(iter(searches.values()))
    study, recorded = _study(d)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(dashboard), recorded["storage"], "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                studies = json.loads(urllib.request.urlopen(f"{base}/api/studies", timeout=2).read())
                break
            except OSError:
                time.sleep(0.2)
        [summary] = studies["study_summaries"]
        page = f"{base}/dashboard/studies/{summary['study_id']}/trials"
        chrome = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000"]
        dom = subprocess.run([*chrome, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
        subprocess.run([*chrome, "--window-size=1400,1000", f"--screenshot={tmp_path / 'dashboard.png'}", page],
                       capture_output=True, timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=10)
    text = " ".join(re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script).*?</\1>", "", dom, flags=re.S)).split())
    assert f"{len(study.trials)} Trials" in text, text[:2000]
    for t in study.trials:
        assert f"Trial {t.number} {t.state.name.capitalize()}" in text, (t.number, text[:2000])
    assert study.trials[0].user_attrs["trial_id"] in text  # the first trial's detail is shown with the list
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


@pytest.mark.slow
def test_tensorboard_events_hold_every_report_at_its_training_step(searches):
    """TensorBoard's own reader on each trial's events file: every numeric metric of curves.csv,
    at the same training step, with the same value (event files keep float32)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for d in searches.values():
        curves, metrics = _numeric_curves(d)
        for tid, rows in curves.groupby("trial_id"):
            [events] = list(d.glob(f"simpo_trial_{tid}_*/events.out.tfevents.*"))
            acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
            acc.Reload()
            for m in metrics:
                want = {int(s): v for s, v in zip(rows["step"], rows[m]) if pd.notna(v)}
                got = {e.step: e.value for e in acc.Scalars(f"ray/tune/{m}")} if want else {}
                assert got == pytest.approx(want, rel=1e-6, abs=1e-30), (tid, m)


@pytest.mark.slow
def test_mlflow_runs_hold_every_report_at_its_training_step(searches):
    """report_to: [mlflow] in the space's base: MLflow's client reads one run per trial (tagged
    with its trial id) from the experiment's mlflow.db, every metric equal to curves.csv."""
    from mlflow.tracking import MlflowClient

    for d in searches.values():
        client = MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(d.name)
        runs = {r.data.tags["trial_id"]: r for r in client.search_runs([experiment.experiment_id])}
        curves, metrics = _numeric_curves(d)
        assert set(runs) == set(curves["trial_id"])
        for tid, rows in curves.groupby("trial_id"):
            run = runs[tid]
            assert run.info.status == "FINISHED"
            for m in metrics:
                want = {int(s): v for s, v in zip(rows["step"], rows[m]) if pd.notna(v)}
                got = {h.step: h.value for h in client.get_metric_history(run.info.run_id, m)} if want else {}
                assert got == pytest.approx(want, rel=1e-12), (tid, m)


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
    for _, r in diag.iterrows():  # length exploitation is this project's check, not the guide's
        assert r["advice"].startswith("guide:" if r["check"] != "length exploitation" else "not from the guide")


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


@pytest.mark.slow
def test_missing_directory(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_cli(tmp_path / "nope", "--out", out), out, "no such directory")


@pytest.mark.slow
def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_clean_failure(run_cli(tmp_path / "empty", "--out", out), out, "empty")


@pytest.mark.slow
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


@pytest.mark.slow
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
    from analysis.tables import top_k

    assert [top_k(n) for n in (1, 2, 3, 6, 12, 13, 40)] == [1, 2, 3, 3, 3, 4, 10]


# ---------------------------------------------------------------- one ranking, one search.json

def write_search(d: Path, trials: pd.DataFrame, curves: pd.DataFrame | None = None, **changes) -> Path:
    """An experiment directory as the search writes it, with a hand-made trials table (and
    learning curves)."""
    import dataclasses

    from simpo_ray.search.records import SearchRecord
    from simpo_ray.search.plan import load

    record = SearchRecord.from_space(load(TINY_SPACE), TINY_SPACE, d.name)
    SearchRecord.write(dataclasses.replace(record, **changes), str(d))
    trials.to_csv(d / "trials.csv", index=False)
    if curves is not None:
        curves.to_csv(d / "curves.csv", index=False)
    return d


def tied_trials() -> pd.DataFrame:
    """Three trials tie on the best value over the run and differ in the final value; a fourth
    has a better final value but a worse best; a diverged one peaked higher before diverging."""
    rows = [("a", "completed", 0.50, 0.30, 12), ("b", "completed", 0.50, 0.45, 12),
            ("c", "stopped_early", 0.50, 0.20, 6), ("d", "completed", 0.48, 0.48, 12),
            ("e", "diverged", 0.90, 0.10, 4), ("f", "errored", float("nan"), float("nan"), 0)]
    return pd.DataFrame([
        {"trial_id": tid, "status": status, "is_default": tid == "d", "steps": steps,
         "objective_value": final, "best_objective": best, "best_step": steps,
         "learning_rate": 1e-3 * (i + 1), "beta": 2.0, "gamma_beta_ratio": 0.5, "sft_weight": 0.1 * i}
        for i, (tid, status, best, final, steps) in enumerate(rows)])


# Trials run with a reward model, from step 0 to their last report: (raw win rate, LC win rate,
# mean generated tokens, success rate). All start from one model: 0.50, 0.50, 40 tokens, 0.30.
GENERATION_TRIALS = {
    "long": ((0.62, 0.51, 56.0, 0.35), 0.0),  # win +0.12, LC flat, +40% length: exploits length
    "lcdrop": ((0.58, 0.44, 70.0, 0.20), 0.1),  # win up, LC down, +75% length: exploits length too
    "good": ((0.66, 0.63, 46.0, 0.60), 0.8),  # win up with LC up, +15% length: a real improvement
    "terse": ((0.57, 0.51, 43.0, 0.40), 0.5),  # win up, LC flat, but only +7.5% length: not flagged
}


def generation_search(d: Path) -> Path:
    """A finished search whose trials report the reward-model metrics, written by the search's
    own `results.build_tables` from Tune-like results (four reports each, linear in between)."""
    from simpo_ray.search.results import build_tables

    class Result:  # the parts of a Tune Result that build_tables reads
        def __init__(self, tid: str, last: tuple, sft_weight: float):
            self.path, self.error = f"/nowhere/{tid}", None
            self.config = {"learning_rate": 1e-3, "beta": 2.0, "gamma_beta_ratio": 0.5, "sft_weight": sft_weight}
            reports = [{"step": s, "eval/reward_win_rate": 0.5 + f * (last[0] - 0.5),
                        "eval/reward_win_rate_lc": 0.5 + f * (last[1] - 0.5),
                        "eval/gen_length": 40 + f * (last[2] - 40), "eval/baseline_gen_length": 42.0,
                        "eval/success_rate": 0.3 + f * (last[3] - 0.3), "eval/reward_mean": f,
                        "eval/generation_step": s}
                       for s, f in ((0, 0.0), (4, 1 / 3), (8, 2 / 3), (12, 1.0))]
            self.metrics_dataframe = pd.DataFrame(reports)
            self.metrics = {**reports[-1], "trial_id": tid, "status": "completed", "total_steps": 12}

    fake = [Result(tid, last, sft) for tid, (last, sft) in GENERATION_TRIALS.items()]
    trials, curves = build_tables(fake, objective="eval/success_rate", mode="max", default_point=fake[3].config,
                                  info={"size_bucket": "cpu", "name": d.name})
    d.mkdir(parents=True)
    return write_search(d, trials, curves, num_samples=len(fake), state="finished")


def test_length_exploitation_is_flagged_plotted_and_tabled(tmp_path):
    """Win rate up, LC win rate flat (or down) and answers 10% longer or more: flagged, named,
    with the rule in the report; a trial whose LC win rate rose with its length is not, nor one
    whose length barely moved. The new metrics reach trials.csv, the tables and their own plot."""
    from analysis import diagnose, plots
    from analysis.load import load_results
    from analysis.run import analyse

    d = generation_search(tmp_path / "gen")
    written = pd.read_csv(d / "trials.csv", dtype={"trial_id": str}).set_index("trial_id")
    for tid, ((win, lc, length, _), _) in GENERATION_TRIALS.items():
        assert written.at[tid, "final_eval/reward_win_rate_lc"] == pytest.approx(lc)
        assert written.at[tid, "final_eval/gen_length"] == pytest.approx(length)

    loaded = load_results([d])
    flags = diagnose.trial_flags(loaded).set_index("trial_id")
    assert flags["length_exploitation"].to_dict() == {"good": False, "lcdrop": True, "long": True, "terse": False}
    row = diagnose.diagnose(loaded).set_index("check").loc["length exploitation"]
    assert sorted(row["trials"].split()) == ["lcdrop", "long"]
    assert "long (win +0.120, LC +0.010, length +40%)" in row["finding"]
    assert diagnose.LENGTH_RULE in row["finding"] and "best trial" not in row["finding"]  # good is best

    out = analyse([d], tmp_path / "out")
    md = (out / "recommendations.md").read_text()
    assert "(plots/cpu-tiny_objective_vs_length.png)" in md
    assert (out / "plots" / "cpu-tiny_objective_vs_length.png").stat().st_size > 5000
    assert f"{diagnose.LENGTH_RULE}): lcdrop" in md
    assert "final LC win rate 0.63, win rate 0.66, 46 generated tokens (baseline 42)" in md  # the best trial
    bvd = pd.read_csv(out / "best_vs_default.csv").iloc[0]
    assert (bvd["best_final_lc_win_rate"], bvd["default_final_gen_length"]) == pytest.approx((0.63, 43.0))
    assert "final_lc_win_rate" in pd.read_csv(out / "cross_size.csv")
    # A search without a reward model: no such plot, no error.
    assert plots.objective_vs_length(load_results([intact_search(tmp_path / "plain")]), "cpu/tiny") is None


class _GenResult:
    """The parts of a Tune Result that results.finish reads: a trial reporting at steps 0, 4, 8 the
    success rate, the win rates and the two checks of the generations (`generation_checks`)."""

    def __init__(self, tid: str, success: float, truncated: float, separates: float, lr: float):
        self.path, self.error = f"/nowhere/{tid}", None
        self.config = {"learning_rate": lr, "beta": 2.0, "gamma_beta_ratio": 0.5, "sft_weight": 0.1}
        reports = [{"step": s, "eval/success_rate": success * s / 8, "eval/reward_win_rate": 0.5 + s / 16,
                    "eval/reward_win_rate_lc": 0.5 + s / 16.1, "eval/gen_length": 64.0,
                    "eval/truncated_rate": truncated if s else 0.0, "eval/length_separates": separates if s else 0.0}
                   for s in (0, 4, 8)]
        self.metrics_dataframe = pd.DataFrame(reports)
        self.metrics = {**reports[-1], "trial_id": tid, "status": "completed", "total_steps": 8}


@pytest.mark.parametrize("best", ["cut", "fine"])
def test_a_best_trial_whose_generations_were_cut_or_won_by_length_is_warned_about(tmp_path, capsys, best):
    """Trial "cut" wrote 6 of 8 answers to max_new_tokens and won exactly by length; "fine" did
    neither. Whichever is best, the search summary and the analysis say so in one line beside its
    metrics when it is "cut", and nothing when it is "fine"."""
    from analysis.run import analyse
    from simpo_ray.search.plan import load
    from simpo_ray.search.records import SearchRecord
    from simpo_ray.search.results import finish

    space = load(TINY_SPACE)
    exp = tmp_path / "exp"
    record = SearchRecord.from_space(space, TINY_SPACE, "exp")
    record.write(str(exp))
    good = {"cut": 0.9, "fine": 0.6}
    if best == "fine":
        good = {"cut": 0.6, "fine": 0.9}
    fake = [_GenResult("cut", good["cut"], 6 / 8, 1.0, 1e-3), _GenResult("fine", good["fine"], 1 / 8, 0.0, 2e-3)]
    finish(fake, space, str(exp), dataclasses.replace(record, num_samples=2), verbose=1)
    said = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    md = (analyse([exp], tmp_path / "out") / "recommendations.md").read_text()
    warned = [line for line in md.splitlines() if "warning" in line]
    if best == "fine":
        assert said == [] and warned == []
        return
    assert said == ["best trial cut at step 8: warning: 75% of generations were cut at max_new_tokens (no "
                    "end-of-turn token), so the scores rate unfinished answers; length alone separates wins "
                    "from losses (every win's length over its baseline is above every loss's), so the LC win "
                    "rate rests on its fit's penalty, not on the data"]
    assert len(warned) == 1 and warned[0].startswith("⚠ Best trial `cut`'s final model: warning: 75% of generations")
    lines = md.splitlines()
    assert lines[lines.index(warned[0]) - 2].startswith("Best trial `cut`")  # under the best trial's line
    written = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str}).set_index("trial_id")
    assert written.at["cut", "final_eval/truncated_rate"] == 0.75 and written.at["cut", "final_eval/length_separates"] == 1


def test_tied_best_values_the_search_and_the_analysis_pick_the_same_trial(tmp_path):
    """On a tie of the best value the better final value wins, in the search's summary, its
    best_config.yaml (results.best_trial), trials.csv's rank and every analysis table."""
    from analysis import report, tables
    from analysis.load import load_results
    from simpo_ray.search import results
    from simpo_ray.search.records import rank_column

    trials = tied_trials()
    best = results.best_trial(trials, "max")
    assert best["trial_id"] == "b"
    summary = results.summary_table(trials, "max").splitlines()
    assert [line.split(" | ")[1] for line in summary[2:]] == ["b", "a", "c", "d (default)"]
    assert list(rank_column(trials, "max")) == [2, 1, 3, 4, pd.NA, pd.NA]

    d = write_search((tmp_path / "tied"), trials.assign(rank=rank_column(trials, "max")))
    loaded = load_results([d])
    size = loaded.sizes[0]
    assert tables.best_trial(loaded, size)["trial_id"] == "b"
    assert list(loaded.ranked(size)["trial_id"]) == ["b", "a", "c", "d"]
    bvd = report.best_vs_default(loaded).iloc[0]
    assert (bvd["best_trial"], bvd["best_score"], bvd["best_final_score"]) == ("b", 0.50, 0.45)
    assert bvd["improvement"] == pytest.approx(0.02)
    rec = report.recommendations(loaded).set_index("parameter")
    assert rec.at["learning_rate", "recommended"] == pytest.approx(2e-3)
    assert report.cross_size(loaded).iloc[0]["final_score"] == 0.45


def test_tied_best_values_in_min_mode_prefer_the_lower_final_value():
    from simpo_ray.search.records import ranked

    trials = tied_trials().assign(best_objective=lambda t: -t["best_objective"],
                                  objective_value=lambda t: -t["objective_value"])
    assert list(ranked(trials, "min")["trial_id"]) == ["b", "a", "c", "d"]
    same = trials.assign(objective_value=0.0)
    assert list(ranked(same, "min")["trial_id"]) == ["a", "b", "c", "d"]  # longer run, then id


def test_search_record_round_trips_and_rejects_other_schemas(tmp_path):
    from simpo_ray.errors import UserError
    from simpo_ray.search.records import SCHEMA_VERSION, SearchRecord

    d = write_search(tmp_path / "s", tied_trials())
    record = SearchRecord.read(d / "search.json")
    assert record.schema_version == SCHEMA_VERSION and record.name == "s"
    assert record.model_name_or_path == "bundled:tiny" and record.mode == record.search["mode"]
    assert {"scheduler", "time_attr", "grace_period", "reduction_factor", "max_t"} <= set(record.search)
    assert set(record.params) <= set(PARAMS) and record.guide["defaults"].keys() >= set(PARAMS)
    data = json.loads((d / "search.json").read_text())
    for bad, needle in [({**data, "schema_version": 99}, "schema_version 99"),
                        ({k: v for k, v in data.items() if k != "objective"}, "missing field(s) objective"),
                        ({**data, "seed": "zero"}, "field seed is 'zero', expected int"),
                        ({**data, "mode": "best"}, "field mode is 'best'"),
                        ({**data, "extra": 1}, "unknown field(s) extra")]:
        (d / "search.json").write_text(json.dumps(bad))
        with pytest.raises(UserError, match=r"search\.json: ") as info:
            SearchRecord.read(d / "search.json")
        assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content, needle", [("{not json", "not valid JSON"),
                                             ('{"schema_version": 99}', "schema_version 99")])
@pytest.mark.slow
def test_cli_rejects_a_bad_search_json_in_one_line(tmp_path, content, needle):
    d = write_search(tmp_path / "s", tied_trials())
    (d / "search.json").write_text(content)
    out = tmp_path / "out"
    assert_clean_failure(run_cli(d, "--out", out), out, needle)


# ---------------------------------------------------------------- damaged or partial tables (issue 15, item 5)

def intact_search(d: Path, **changes) -> Path:
    """A finished search of the six `tied_trials` with learning curves, as the search writes it."""
    from simpo_ray.search.records import rank_column

    trials = tied_trials()
    write_search(d, trials.assign(rank=rank_column(trials, "max")),
                 **{"num_samples": len(trials), "state": "finished", **changes})
    rows = [{"trial_id": r.trial_id, "step": s, "eval/success_rate": r.best_objective}
            for r in trials.itertuples() for s in range(0, int(r.steps) + 1, 2) if r.steps > 0]
    pd.DataFrame(rows).to_csv(d / "curves.csv", index=False)
    return d


def _edit_trials(d: Path, edit) -> None:
    t = pd.read_csv(d / "trials.csv", dtype={"trial_id": str}, keep_default_na=False)
    edit(t).to_csv(d / "trials.csv", index=False)


def _set(trial_id: str, column: str, value):
    def edit(t):
        t[column] = t[column].astype(object)
        t.loc[t["trial_id"] == trial_id, column] = value
        return t
    return edit


DAMAGE = [
    ("duplicated-row", lambda t: pd.concat([t, t[t["trial_id"] == "a"]]), r"rows 2 and 8: trial a appears 2 times"),
    ("objective-abc", _set("b", "best_objective", "abc"), r"row 3 \(trial b\): best_objective is 'abc', not a number"),
    ("lr-negative", _set("c", "learning_rate", -1),
     r"row 4 \(trial c\): learning_rate -1 is outside the searched range \[0.0001, 0.01\] \(search.json\)"),
    ("status-misspelt", _set("d", "status", "complted"),
     r"row 5 \(trial d\): status 'complted' is not one of completed, stopped_early, diverged, errored, interrupted"),
    ("steps-text", _set("a", "steps", "twelve"), r"row 2 \(trial a\): steps is 'twelve', not a number"),
    ("row-missing", lambda t: t[t["trial_id"] != "d"],
     r"5 trials, but search.json says the finished search ran 6; rows are missing"),
    ("too-many-rows", lambda t: pd.concat([t, t.assign(trial_id=t["trial_id"] + "x")]),
     r"12 trials, but search.json says the search ran 6"),
]


@pytest.mark.parametrize("case, edit, needle", DAMAGE, ids=[c[0] for c in DAMAGE])
def test_damaged_trials_table_is_refused_naming_file_and_row(tmp_path, case, edit, needle):
    from analysis.load import load_results
    from simpo_ray.errors import UserError

    d = intact_search(tmp_path / "s")
    load_results([d])  # intact: accepted
    _edit_trials(d, edit)
    with pytest.raises(UserError, match=needle) as info:
        load_results([d])
    assert str(info.value).startswith(f"{d / 'trials.csv'}: ") and "\n" not in str(info.value)


def test_curves_that_do_not_match_the_trials_are_refused(tmp_path):
    from analysis.load import load_results
    from simpo_ray.errors import UserError

    d = intact_search(tmp_path / "s")
    curves = pd.read_csv(d / "curves.csv", dtype={"trial_id": str})
    pd.concat([curves, curves.head(1).assign(trial_id="zzz")]).to_csv(d / "curves.csv", index=False)
    with pytest.raises(UserError, match=r"curves.csv: row \d+: trial zzz is not in trials.csv"):
        load_results([d])
    curves[curves["trial_id"] != "a"].to_csv(d / "curves.csv", index=False)
    with pytest.raises(UserError, match=r"curves.csv: no learning curve for trial a"):
        load_results([d])
    pd.concat([curves, curves.tail(1)]).to_csv(d / "curves.csv", index=False)
    with pytest.raises(UserError, match=r"curves.csv: row \d+: trial f?\w+ step \d+ appears twice"):
        load_results([d])


@pytest.mark.slow
def test_a_trials_table_cut_short_is_one_error_line(tmp_path):
    """trials.csv cut to 60% of its bytes (a copy that stopped half-way): today's analysis ran
    on the rows that were left and named a wrong best trial; now exit 2, naming file and row."""
    d = intact_search(tmp_path / "s")
    data = (d / "trials.csv").read_bytes()
    (d / "trials.csv").write_bytes(data[: int(len(data) * 0.6)])
    out = tmp_path / "out"
    assert_clean_failure(run_cli(d, "--out", out), out, f"{d / 'trials.csv'}: row ")
    assert "is cut short" in run_cli(d, "--out", out).stderr


def test_a_report_from_an_interrupted_search_says_it_is_partial(tmp_path):
    from analysis.run import analyse

    d = intact_search(tmp_path / "s", state="interrupted", num_samples=8)
    _edit_trials(d, _set("e", "status", "interrupted"))
    out = analyse([d], tmp_path / "out")
    text = (out / "recommendations.md").read_text()
    assert f"**Partial results** from `{d}`: the search was interrupted: 6 of 8 trials, 1 cut" in text
    # A finished search's report says nothing of the kind.
    out2 = analyse([intact_search(tmp_path / "t")], tmp_path / "out2")
    assert "Partial results" not in (out2 / "recommendations.md").read_text()


def test_text_in_a_learning_curves_metric_is_refused(tmp_path):
    """Every metric column of curves.csv is a number or empty, not only `step`."""
    from analysis.load import load_results
    from simpo_ray.errors import UserError

    d = intact_search(tmp_path / "s")
    curves = pd.read_csv(d / "curves.csv", dtype={"trial_id": str})
    curves["eval/success_rate"] = curves["eval/success_rate"].astype(object)
    curves.loc[3, "eval/success_rate"] = "abc"
    curves.to_csv(d / "curves.csv", index=False)
    with pytest.raises(UserError, match=r"curves.csv: row 5 \(trial \w+\): eval/success_rate is 'abc', not a number"):
        load_results([d])


@pytest.mark.parametrize("case, edit, needle", [DAMAGE[1], DAMAGE[5]], ids=["objective-abc", "row-missing"])
def test_the_warm_start_refuses_what_analysis_refuses(tmp_path, case, edit, needle):
    """One validator: a trials.csv the analysis refuses is refused by the warm start too (it
    used to drop an 'abc' row for a wrong reason and use a table missing rows)."""
    from simpo_ray.errors import UserError
    from simpo_ray.transfer.finished import load_finished

    d = intact_search(tmp_path / "s")
    assert len(load_finished([d])[0].trials) == 6
    _edit_trials(d, edit)
    with pytest.raises(UserError, match=needle) as info:
        load_finished([d])
    assert str(info.value).startswith(f"{d / 'trials.csv'}: ")
