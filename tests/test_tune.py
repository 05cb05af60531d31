"""The search end to end: real Ray, Optuna and Train on the bundled task.

- a search with more trials than slots, where ASHA stops trials at a rung and the divergence
  check catches a planted divergent trial;
- `--resume` after the driver process is SIGKILLed mid-search: no trial lost or duplicated;
- a multi-node run: a local cluster of two 1-CPU Ray nodes, one trial of 2 workers over both;
- `--dry-run` for every shipped space, and validation errors for bad spaces.

Every expectation is computed here from the inputs (the YAML, the guide's tables, the curves
the trials reported, Optuna's own study), not read back from the code under test.
"""

from __future__ import annotations

import glob
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"
TINY = SPACES / "cpu-tiny.yaml"
SHIPPED = sorted(SPACES.glob("*.yaml"))

# The planted divergence: lr 1e30 without warmup overflows fp32 on the first update, so the loss
# of step 2 is NaN (tests/test_train.py::test_planted_divergence_is_reported_not_trained_on).
DIVERGENT_LR = 1e30
# The guide's documented starting point for the `cpu` bucket (guide.CPU_LR_DEFAULT and the
# bucket's standard config), written out here rather than read from the code under test.
CPU_DEFAULT = {"learning_rate": 1e-3, "beta": 2.0, "gamma_beta_ratio": 0.5, "sft_weight": 0.0}


def _write_space(path: Path, *, params=None, base=None, search=None, resources=None, **top) -> Path:
    """cpu-tiny.yaml with some sections replaced/updated, written to `path`."""
    data = yaml.safe_load(TINY.read_text())
    if params:
        data["params"].update(params)
    if base:
        data["base"].update(base)
    if search:
        data["search"].update(search)
    if resources:
        data["resources"].update(resources)
    data.update(top)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # never join the test session's cluster
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simpo_ray.tune", *args], cwd=ROOT, env=_subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def _optuna_study(exp: Path):
    """(study, {tune trial id: optuna trial number}) from the searcher state Tune saved."""
    # One file per driver session (a resumed search adds one), named by the session's start time;
    # the latest session's holds the whole study. (Not by mtime: Tune rewrites both at once.)
    state = sorted(exp.glob("searcher-state-*.pkl"))[-1]
    with open(state, "rb") as f:
        saved = pickle.load(f)
    return saved["_ot_study"], {tid: t.number for tid, t in saved["_ot_trials"].items()}


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-15)


def _same_params(row, point: dict[str, float]) -> bool:
    return all(_close(row[k], v) for k, v in point.items())


# ------------------------------------------------------------------------------------------
# A real search: more trials than slots, ASHA stops, a planted divergence
# ------------------------------------------------------------------------------------------

MAX_STEPS, EVAL_STEPS, GRACE, RF = 40, 20, 20, 3
# G: a setting that is far better than the default at step 20 on the bundled task (sft_weight
# keeps generation working; the default's sft_weight 0 makes the success rate drop first).
GOOD = {"learning_rate": 3e-3, "sft_weight": 1.0}
# B: the default with beta nudged: the same success rate as the default at the rung, so once
# the default and G have reported there, B is below ASHA's cutoff (which lies above the default).
NEAR_DEFAULT = {"beta": 2.000001}


@pytest.mark.slow
def test_search_asha_stops_trials_and_divergence_is_caught(ray_cluster, tmp_path):
    import ray

    from simpo_ray.config import load_train_config
    from simpo_ray.search.run import run_search
    from simpo_ray.infra.cluster import plan_concurrency
    from ray_helpers import resources_settled
    from simpo_ray.config import Resources

    # An extra point must lie inside the searched range (space.py), so the learning rate is a
    # choice that includes the divergent value (outside the guide: allow_out_of_range). Sampled
    # trials may draw it too; every trial with it must diverge, and only those.
    lrs = [1e-4, 1e-3, 3e-3, 1e-2, DIVERGENT_LR]
    space = _write_space(
        tmp_path / "space.yaml",
        params={"learning_rate": {"distribution": "choice", "values": lrs}},
        search={"points_to_evaluate": {"references": False, "extra": [
            GOOD, {"learning_rate": DIVERGENT_LR}, NEAR_DEFAULT]}},
    )
    num_samples = 5
    slots = plan_concurrency(ray_cluster, Resources(1, 1.0))
    assert slots == 2 < num_samples  # more trials than slots
    t0 = time.monotonic()
    exp = run_search(space, storage_path=str(tmp_path / "results"), name="search", allow_out_of_range=True,
                     overrides={"base.max_steps": MAX_STEPS, "base.eval_steps": EVAL_STEPS,
                                "base.warmup_ratio": 0.0, "base.generation_eval_samples": 64,
                                "base.max_eval_samples": 128, "search.num_samples": num_samples,
                                "search.scheduler": "asha", "search.grace_period": GRACE,
                                "search.max_t": MAX_STEPS, "search.reduction_factor": RF,
                                "search.seed": 0},
                     verbose=0)
    wall = time.monotonic() - t0
    assert exp == tmp_path / "results" / "search"
    trials = pd.read_csv(exp / "trials.csv")
    curves = pd.read_csv(exp / "curves.csv")
    print(f"search wall {wall:.0f}s\n", trials[["trial_id", "status", "learning_rate", "beta", "sft_weight",
                                                  "steps", "objective_value", "best_objective"]])

    # One row per trial, none errored.
    assert len(trials) == num_samples and trials["trial_id"].is_unique
    counts = trials["status"].value_counts().to_dict()
    assert set(counts) <= {"completed", "stopped_early", "diverged"}, counts
    # Every trial with the divergent learning rate diverged, and only those.
    divergent = trials["learning_rate"].map(lambda x: _close(x, DIVERGENT_LR))
    assert (trials.loc[divergent, "status"] == "diverged").all()
    assert (trials.loc[~divergent, "status"] != "diverged").all()
    assert counts.get("diverged", 0) == divergent.sum() >= 1

    # The documented default ran, is flagged, and has exactly the guide's values.
    default = trials[trials["is_default"]]
    assert len(default) == 1
    assert _same_params(default.iloc[0], CPU_DEFAULT)
    assert sum(_same_params(r, CPU_DEFAULT) for _, r in trials.iterrows()) == 1

    # The planted divergent point: diverged within its first steps, reported the worst
    # objective (0.0 for a success rate), and Optuna was told exactly that value.
    planted = trials[[_same_params(r, {**CPU_DEFAULT, "learning_rate": DIVERGENT_LR}) for _, r in trials.iterrows()]]
    assert len(planted) == 1
    d = planted.iloc[0]
    assert d["status"] == "diverged" and 1 <= d["steps"] < EVAL_STEPS
    assert d["objective_value"] == 0.0 and d["best_objective"] == 0.0
    study, numbers = _optuna_study(exp)
    assert len(study.trials) == num_samples
    # Ran its budget or diverged (at the worst value of a rate: what steers TPE away): COMPLETE;
    # stopped by ASHA: PRUNED, valued at its last report.
    state = {"completed": "COMPLETE", "diverged": "COMPLETE", "stopped_early": "PRUNED"}
    for _, r in trials.iterrows():
        assert study.trials[numbers[r["trial_id"]]].state.name == state[r["status"]], r["trial_id"]
    assert "PRUNED" in {t.state.name for t in study.trials}
    assert study.trials[numbers[d["trial_id"]]].value == 0.0
    for _, r in trials.iterrows():  # Optuna saw each trial's last reported objective
        assert study.trials[numbers[r["trial_id"]]].value == pytest.approx(r["objective_value"])
    # The points ran first, in order (Optuna trial numbers 0..3).
    for i, pt in enumerate([CPU_DEFAULT, {**CPU_DEFAULT, **GOOD}, {**CPU_DEFAULT, "learning_rate": DIVERGENT_LR},
                            {**CPU_DEFAULT, **NEAR_DEFAULT}]):
        assert _same_params(pd.Series(study.trials[i].params), pt), (i, study.trials[i].params)

    # Curves: every trial has the untrained baseline at step 0, identical across trials.
    assert set(curves["trial_id"]) == set(trials["trial_id"])
    step0 = curves[curves["step"] == 0]
    assert sorted(step0["trial_id"]) == sorted(trials["trial_id"])
    assert step0["eval/preference_accuracy"].nunique() == 1 and step0["eval/success_rate"].nunique() == 1
    assert not curves.duplicated(["trial_id", "step"]).any()
    objective = "eval/success_rate"
    at = {tid: dict(zip(g["step"], g[objective])) for tid, g in curves.groupby("trial_id")}
    for _, r in trials.iterrows():
        assert max(at[r["trial_id"]]) == r["steps"]  # the last curve point is the trial's last step
        assert at[r["trial_id"]][r["steps"]] == pytest.approx(r["objective_value"])

    # ASHA: rungs at grace * rf^k below max_t. Stopped trials ended exactly on a rung, with a
    # value there below some other trial's value at that rung; completed ones ran to max_t.
    rungs = [GRACE * RF**k for k in range(10) if GRACE * RF**k < MAX_STEPS]
    assert rungs == [20]
    stopped = trials[trials["status"] == "stopped_early"]
    assert len(stopped) >= 1
    for _, r in stopped.iterrows():
        assert r["steps"] < MAX_STEPS and r["steps"] in rungs
        others = [at[t][r["steps"]] for t in at if t != r["trial_id"] and r["steps"] in at[t]]
        assert at[r["trial_id"]][r["steps"]] < max(others)
    for _, r in trials[trials["status"] == "completed"].iterrows():
        assert r["steps"] == MAX_STEPS and sorted(at[r["trial_id"]]) == [0, 20, 40]
    # The planted pair: G is far better than the default at the rung, so the near-default
    # point B (same value as the default) is stopped there.
    g = trials[[_same_params(r, {**CPU_DEFAULT, **GOOD}) for _, r in trials.iterrows()]].iloc[0]
    b = trials[[_same_params(r, {**CPU_DEFAULT, **NEAR_DEFAULT}) for _, r in trials.iterrows()]].iloc[0]
    assert at[g["trial_id"]][20] > at[default.iloc[0]["trial_id"]][20]
    assert b["status"] == "stopped_early" and b["steps"] == 20

    # best_config.yaml: a valid training config holding the best trial's parameters, where
    # "best" is recomputed here from the curves (max over trained steps, diverged excluded).
    best_value = {tid: max(v for s, v in pts.items() if s > 0) for tid, pts in at.items()
                  if trials.set_index("trial_id").loc[tid, "status"] != "diverged"}
    best_id = max(best_value, key=best_value.get)
    best = trials.set_index("trial_id").loc[best_id]
    assert best["best_objective"] == pytest.approx(best_value[best_id])
    cfg = load_train_config(exp / "best_config.yaml")
    for k in CPU_DEFAULT:
        assert _close(getattr(cfg, k), best[k]), k
    assert cfg.max_steps == MAX_STEPS and cfg.model_name_or_path == "bundled:tiny"

    info = json.loads((exp / "search.json").read_text())
    assert (info["objective"], info["mode"], info["seed"], info["num_samples"]) == (objective, "max", 0, num_samples)

    # All CPUs come back (stopped trials' worker placement groups are freed).
    assert resources_settled(timeout_s=30)
    assert ray.available_resources().get("CPU") == 2


# ------------------------------------------------------------------------------------------
# --dry-run for every shipped space
# ------------------------------------------------------------------------------------------


def _expected_searched(name: str, spec: dict, bucket: str, task, model_type) -> str:
    """The searched-range cell, from the YAML and the guide's tables."""
    from simpo_ray import guide

    if spec["distribution"] == "choice":
        return "choice {" + ", ".join(f"{float(v):g}" for v in spec["values"]) + "}"
    if "range" in spec:
        fn = guide.documented_range if spec["range"] == "documented" else guide.recommended_range
        lo, hi = fn(name, bucket, task, model_type)
    else:
        lo, hi = float(spec["low"]), float(spec["high"])
    return f"{spec['distribution']} {lo:g} to {hi:g}"


def _expected_gpu_hours(data: dict) -> tuple[int, float]:
    """(steps, GPU-hours) of one trial: 6 * params * tokens at 35 % MFU of an H100's 989 TFLOP/s."""
    b, r, s, e = data["base"], data["resources"], data["search"], data["estimate"]
    batch = b["per_device_train_batch_size"] * b.get("gradient_accumulation_steps", 1) * r["num_workers"]
    steps = math.ceil(b.get("num_train_epochs", 1) * math.ceil(e["train_pairs"] / batch))
    if b.get("max_steps", -1) > 0:
        steps = b["max_steps"]
    assert s["time_attr"] == "step"
    steps = min(steps, s["max_t"])
    flops = 6 * e["params_billion"] * 1e9 * steps * batch * e["tokens_per_pair"]
    return steps, flops / (e.get("peak_tflops", 989.0) * 1e12 * e.get("mfu", 0.35)) / 3600


def _suggestions(searcher, n):
    searcher.set_search_properties(None, None, {})
    return [searcher.suggest(f"t{i}") for i in range(n)]


def test_sampler_option_builds_tpe_or_seeded_random_search():
    """`search.sampler` picks Optuna's TPE or RandomSampler; both replay points_to_evaluate first,
    and the random proposals are Optuna's own RandomSampler draws for the seed."""
    import optuna

    from simpo_ray.search.searcher import make_searcher
    from simpo_ray.search.plan import load

    tpe = load(TINY)
    assert tpe.search.sampler == "tpe"
    assert isinstance(make_searcher(tpe)._sampler, optuna.samplers.TPESampler)

    rnd = load(TINY, sampler="random", seed=7)
    searcher = make_searcher(rnd)
    assert isinstance(searcher._sampler, optuna.samplers.RandomSampler)
    n_points = len(rnd.points_to_evaluate)
    got = _suggestions(searcher, n_points + 3)
    for pt, suggestion in zip(rnd.points_to_evaluate, got):
        assert suggestion == pytest.approx({k: v for k, v in pt.items() if k in rnd.params})
    # The same seed gives the same draws; the draws are inside the space's bounds.
    again = _suggestions(make_searcher(load(TINY, sampler="random", seed=7)), n_points + 3)
    assert again == got
    other = _suggestions(make_searcher(load(TINY, sampler="random", seed=8)), n_points + 3)
    assert other[n_points:] != got[n_points:]
    for s in got[n_points:]:
        for name, p in rnd.params.items():
            if p.distribution == "choice":
                assert s[name] in p.values
            else:
                assert p.low <= s[name] <= p.high


def test_tpe_settings_reach_optuna_and_are_refused_for_random_search():
    """`search.tpe_multivariate` / `search.tpe_startup_trials` configure Optuna's TPESampler; the
    defaults keep Optuna's own choice (multivariate for one objective) and points + 2 start-up
    trials, and leave the resume record as before the keys; a random search refuses them in one
    line naming the keys."""
    import optuna

    from simpo_ray.config import ConfigError
    from simpo_ray.search.records import resolved_space
    from simpo_ray.search.searcher import make_searcher
    from simpo_ray.search.plan import load

    default = load(TINY)
    sampler = make_searcher(default)._sampler
    study = optuna.create_study(direction="maximize")
    assert sampler._n_startup_trials == max(len(default.points_to_evaluate) + 2, 4)
    assert sampler._is_multivariate(study) == optuna.samplers.TPESampler()._is_multivariate(study) is True
    assert "tpe_multivariate" not in resolved_space(default)["search"]
    tuned = load(TINY, overrides={"search.tpe_multivariate": False, "search.tpe_startup_trials": 2})
    sampler = make_searcher(tuned)._sampler
    assert (sampler._is_multivariate(study), sampler._n_startup_trials) == (False, 2)
    assert resolved_space(tuned)["search"]["tpe_startup_trials"] == 2
    # the 3rd trial (after the default and one random draw) is TPE's: not the RandomSampler's draw
    searcher = make_searcher(tuned)
    got = _suggestions(searcher, 2)
    for i, point in enumerate(got):
        searcher.on_trial_complete(f"t{i}", {"eval/success_rate": 0.1 * i, **point})
    third = searcher.suggest("t2")
    rnd = _suggestions(make_searcher(load(TINY, sampler="random", seed=tuned.search.seed)), 3)
    assert got == rnd[:2] and third != rnd[2]
    with pytest.raises(ConfigError, match="tpe_multivariate / tpe_startup_trials: set for sampler: random"):
        load(TINY, sampler="random", overrides={"search.tpe_multivariate": True})
    with pytest.raises(ConfigError, match="tpe_startup_trials"):
        load(TINY, overrides={"search.tpe_startup_trials": 0})


def test_hyperband_is_asynchronous_hyperband_over_all_brackets():
    """`scheduler: hyperband` is ASHA over HyperBand's s_max + 1 brackets (Li et al.: R=81, r=1,
    eta=3 gives 5), the last never cutting; trials are placed with Ray's softmax-of-rungs odds
    from a generator seeded by the search seed, so the placement repeats with it."""
    import types

    from ray.tune.schedulers import ASHAScheduler

    from simpo_ray.search.searcher import make_scheduler, hyperband_brackets
    from simpo_ray.search.plan import load

    assert [hyperband_brackets(*a) for a in ((1, 3, 81), (200, 3, 600), (100, 2, 600), (600, 3, 600))] == [5, 2, 4, 1]

    def placement(seed, n=400):
        sched = make_scheduler(load(TINY, scheduler="hyperband", seed=seed))  # grace 200, eta 3, max_t 600
        sched.set_search_properties("eval/success_rate", "max")
        for i in range(n):
            sched.on_trial_add(None, types.SimpleNamespace(trial_id=f"t{i}"))
        return sched, [sched._brackets.index(sched._trial_info[f"t{i}"]) for i in range(n)]

    sched, got = placement(0)
    assert isinstance(sched, ASHAScheduler)
    assert [sorted(r for r, _ in b._rungs) for b in sched._brackets] == [[200, 600], [600]]
    share = got.count(0) / len(got)  # softmax of rung counts (2, 1): 1 / (1 + e^-1) = 0.731
    assert abs(share - 1 / (1 + math.exp(-1))) < 0.07
    assert placement(0)[1] == got and placement(1)[1] != got
    # max_t / grace not a power of eta (the 7b space's 80 / 480): the last bracket still cuts nothing
    space = load(TINY, scheduler="hyperband", overrides={"search.grace_period": 80, "search.max_t": 480})
    assert [sorted(r for r, _ in b._rungs) for b in make_scheduler(space)._brackets] == [[80, 240], [240], []]


@pytest.mark.parametrize("space_file", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_dry_run_every_shipped_space(space_file, capsys, monkeypatch):
    import torch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # plan against this machine, as a user would

    from simpo_ray.search.estimate import estimate_gpu_hours
    from simpo_ray.search.plan import load
    from simpo_ray.cli import tune_main as main

    rc = main(["--space", str(space_file), "--dry-run"])
    out, err = capsys.readouterr()
    data = yaml.safe_load(space_file.read_text())
    model = data["base"]["model_name_or_path"]
    if model.startswith("bundled:"):
        assert rc == 0 and err == "", err
    else:  # a Hub model, offline here and not in the cache: refused as the real run would be
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: the search would be refused: model {model}: not in the local Hugging "
                              "Face cache"), err
    lines = out.splitlines()
    for name, spec in data["params"].items():
        [row] = [line for line in lines if line.startswith(name + " ")]
        assert _expected_searched(name, spec, data["size_bucket"], data.get("task"),
                                  data.get("model_type")) in row, row
    r = data["resources"]
    gpus_per_trial = r["num_workers"] * r["gpus_per_worker"]
    assert (f"resources per trial: {r['num_workers']} worker(s) x ({r['cpus_per_worker']:g} CPU, "
            f"{r['gpus_per_worker']:g} GPU) = {gpus_per_trial:g} GPUs") in lines

    # This machine (no --address): whether one trial's workers fit, worked out by hand.
    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    cpw, gpw, nw = r["cpus_per_worker"], r["gpus_per_worker"], r["num_workers"]
    if cpw > cpus or gpw > gpus:
        fits = 0
    else:
        per_node = math.floor(cpus / cpw) if gpw == 0 else min(math.floor(cpus / cpw), math.floor(gpus / gpw))
        fits = per_node // nw
    if fits:
        cap = data["search"].get("max_concurrent") or fits
        assert f"concurrency: {min(fits, cap)} trial(s) at once" in out
        assert "does not fit" not in out
    else:
        [line] = [x for x in lines if x.startswith("does not fit this cluster: ")]
        if cpw > cpus:
            assert f"needs {cpw:g} CPU but no node has that many" in line, line
        elif gpw > gpus:
            assert f"needs {gpw:g} GPU but no node has that many" in line, line
        else:
            assert "room for only" in line, line

    steps, gpu_hours = _expected_gpu_hours(data)
    est = estimate_gpu_hours(load(space_file))
    assert est["steps_per_trial"] == steps
    assert est["gpu_hours_per_trial"] == pytest.approx(gpu_hours, rel=1e-9)
    if gpus_per_trial > 0:
        num = data["search"]["num_samples"]
        assert f"estimate: {steps} steps and " in out
        assert f"; {gpu_hours:.3g} GPU-hours per trial ({gpu_hours / gpus_per_trial:.3g} h on " in out
        assert f"search: at most {gpu_hours * num:.3g} GPU-hours" in out
        asha = est["gpu_hours_asha_estimate"]
        assert asha < gpu_hours * num and f"about {asha:.3g} with asha" in out
    else:
        assert f"estimate: {steps} steps per trial on CPU (no GPU-hours)" in out


DRY_RUN_REFUSALS = {
    # what the space changes: what the one error line says
    "max-length-above-the-model": ({"base": {"max_length": 128}},
                                   "max_length: 128 is above the position limit of model 'bundled:tiny'"),
    "memory-does-not-fit": ({"resources": {"gpus_per_worker": 1, "gpu_memory_gb": 0.05},
                             "base": {"reward_model_name_or_path": None}}, "memory: "),
    "missing-local-model": ({"base": {"model_name_or_path": "./no/such/model"}},
                            "model ./no/such/model: local path does not exist"),
    "hub-name-offline": ({"base": {"model_name_or_path": "some-org/not-cached-model"}},
                         "model some-org/not-cached-model: not in the local Hugging Face cache"),
}


@pytest.mark.parametrize("case", sorted(DRY_RUN_REFUSALS))
def test_the_dry_run_exits_2_where_the_real_run_would_refuse(case, tmp_path, capsys, monkeypatch):
    """`--dry-run` checks what the run checks: each refusal of the real run (before Ray) makes
    the dry run print its plan and then one `error:` line, exit 2."""
    from simpo_ray.cli import tune_main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    changes, needle = DRY_RUN_REFUSALS[case]
    space = _write_space(tmp_path / "space.yaml", **changes)
    rc = tune_main(["--space", str(space), "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("error: the search would be refused: ") and needle in err, err
    assert "resources per trial" in out  # the plan was described first


@pytest.mark.slow
def test_dry_run_cli_process():
    """The real command line: the plan on stdout, for a GPU space; offline (the Hub is never
    reached in tests) its model cannot be found, which the real run refuses: exit 2, one line."""
    proc = _cli("--space", str(SPACES / "70b.yaml"), "--dry-run")
    assert proc.returncode == 2 and proc.stderr.startswith("error: the search would be refused: model "), proc.stderr
    assert "resources per trial: 32 worker(s) x (8 CPU, 1 GPU) = 32 GPUs" in proc.stdout
    assert "GPU-hours per trial" in proc.stdout and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------
# Validation errors: exit 2, one line `error: ...`, no traceback
# ------------------------------------------------------------------------------------------


def _space_7b(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load((SPACES / "7b.yaml").read_text())
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


BAD_SPACES = {
    # The guide documents 1e-7 to 1e-6 for 7B (chat) models.
    "lr_out_of_range": (lambda d: d["params"].update(
        learning_rate={"distribution": "loguniform", "low": 1e-7, "high": 1e-5}),
        ["params.learning_rate.high", "1e-05", "[1e-07, 1e-06]", "--allow-out-of-range"]),
    "low_not_below_high": (lambda d: d["params"].update(beta={"distribution": "uniform", "low": 5.0, "high": 3.0}),
                           ["params.beta", "low 5 >= high 3"]),
    "log_range_touches_zero": (lambda d: d["params"].update(
        learning_rate={"distribution": "loguniform", "low": 0.0, "high": 1e-6}),
        ["params.learning_rate.low", "loguniform"]),
    "unknown_key": (lambda d: d["search"].update(num_sample=3), ["search.num_sample", "did you mean 'num_samples'"]),
    # A generation objective must be fresh at every report a scheduler or the ranking reads.
    "stale_generation_objective": (lambda d: d["base"].update(generation_eval_steps=160),
                                   ["eval/reward_win_rate_lc", "generation_eval_steps (160)", "eval_steps (80)"]),
}


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_space_is_a_one_line_error(case, tmp_path, capsys):
    from simpo_ray.cli import tune_main as main

    mutate, expected = BAD_SPACES[case]
    path = _space_7b(tmp_path, mutate)
    assert main(["--space", str(path), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    line = _one_error_line(err)
    for text in expected:
        assert text in line, line
    # Only a range outside the guide is waived by --allow-out-of-range; malformed ranges are not.
    rc = main(["--space", str(path), "--dry-run", "--allow-out-of-range"])
    out, err = capsys.readouterr()
    if case == "lr_out_of_range":  # accepted; what remains is the offline Hub model, as for the shipped 7b
        assert rc == 2 and "not in the local Hugging Face cache" in _one_error_line(err), err
        [row] = [x for x in out.splitlines() if x.startswith("learning_rate ")]
        assert "loguniform 1e-07 to 1e-05" in row
    else:
        assert rc == 2 and _one_error_line(err) == line


@pytest.mark.slow
def test_bad_space_cli_process(tmp_path):
    path = _space_7b(tmp_path, BAD_SPACES["lr_out_of_range"][0])
    proc = _cli("--space", str(path), "--dry-run")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "[1e-07, 1e-06]" in _one_error_line(proc.stderr)


@pytest.mark.slow
def test_real_search_refuses_trial_needing_more_gpus_than_cluster(ray_cluster, tmp_path, capsys):
    """Not a dry run: the search checks the trial against the live cluster before any trial starts."""
    import ray

    from simpo_ray.cli import tune_main as main

    from simpo_ray.errors import UserError
    from simpo_ray.search.run import run_search

    have = int(ray.cluster_resources().get("GPU", 0))
    path = _write_space(tmp_path / "gpu.yaml", resources={"num_workers": have + 1, "gpus_per_worker": 1})
    storage = tmp_path / "results"
    assert main(["--space", str(path), "--storage-path", str(storage), "--name", "gpu"]) == 2
    assert "GPU" in _one_error_line(capsys.readouterr().err)
    # The search itself checks the live Ray cluster (what a run with --address relies on).
    with pytest.raises(UserError) as err:
        run_search(path, storage_path=str(storage), name="gpu2", verbose=0)
    msg = str(err.value)
    assert ("needs 1 GPU but no node has that many (largest node: 0 GPU, cluster total: 0 GPU)" in msg
            if have == 0 else f"room for only {have} such worker(s)" in msg), msg
    for name in ("gpu", "gpu2"):  # nothing written but the (released) experiment lock
        exp = storage / name
        left = [p.name for p in exp.iterdir()] if exp.exists() else []
        assert set(left) <= {".simpo-ray.lock"}, left


# ------------------------------------------------------------------------------------------
# --resume after the driver is SIGKILLed mid-search
# ------------------------------------------------------------------------------------------

PARAMS = ("learning_rate", "beta", "gamma_beta_ratio", "sft_weight")


def _tune_state(exp: Path) -> dict[str, dict]:
    """Tune's latest saved experiment state: {trial_id: {status, config, last_result}}."""
    files = sorted(exp.glob("experiment_state-*.json"))  # named by session start: latest last
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except (OSError, json.JSONDecodeError):  # replaced while we read it
        return {}
    out = {}
    for state, meta in data["trial_data"]:
        state = json.loads(state) if isinstance(state, str) else state
        meta = json.loads(meta) if isinstance(meta, str) else meta
        out[state["trial_id"]] = {"status": state["status"], "config": state["config"],
                                  "last_result": meta.get("last_result") or {}}
    return out


def _reports(exp: Path) -> dict[str, list[dict]]:
    """{trial_id: the reports in its result.json so far} (a line being written is skipped)."""
    out = {}
    for path in exp.glob("simpo_trial_*/result.json"):
        reports = []
        for line in path.read_text().splitlines():
            try:
                reports.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        out[path.parent.name.split("_")[2]] = reports
    return out


def _result_lines(exp: Path, trial_id: str) -> list[str]:
    [path] = glob.glob(str(exp / f"*_{trial_id}_*" / "result.json"))
    return Path(path).read_text().splitlines()


def _end_processes(procs) -> list[str]:
    """SIGKILL the still-running processes among `procs` (psutil.Process objects we started).

    psutil checks each process's creation time, so a pid reused by someone else is never hit.
    """
    import psutil

    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p.name())
                p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs([p for p in procs if p.is_running()], timeout=10)
    return left


@pytest.mark.slow
def test_resume_after_driver_is_killed_loses_and_duplicates_nothing(tmp_path):
    import psutil

    # 200 steps: trials in their own reused process take a few seconds each, so the last two still
    # run when the first two are seen finished (at 20 steps a quiet machine finished all four first)
    num_samples, max_steps = 4, 200
    space = _write_space(tmp_path / "space.yaml",
                         base={"max_steps": max_steps, "eval_steps": max_steps // 2, "generation_eval_samples": 16,
                               "max_eval_samples": 64},
                         search={"num_samples": num_samples, "max_concurrent": 2, "scheduler": "fifo",
                                 "points_to_evaluate": "default_only"})
    storage = tmp_path / "results"
    exp = storage / "resume"
    args = ["--space", str(space), "--storage-path", str(storage), "--name", "resume"]
    log = open(tmp_path / "first.log", "w")
    # Tune saves its experiment state every ~10 s by default; every second here, so that the
    # kill below comes soon after two trials finished (what Tune saved is what --resume restores).
    env = {**_subprocess_env(), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    first = subprocess.Popen([sys.executable, "-m", "simpo_ray.tune", *args], cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Kill as soon as Tune has saved two trials as finished (the others are starting or
        # half-way: a tiny trial's reports come within seconds of each other, after its start-up).
        deadline = time.monotonic() + 400
        while True:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no two trials finished in time"
            state = _tune_state(exp)
            finished = {t: s for t, s in state.items() if s["status"] == "TERMINATED"}
            if len(finished) >= 2:
                break
            time.sleep(0.25)
        midway = [t for t, reports in _reports(exp).items() if t not in finished and reports]
        assert not (exp / "trials.csv").exists()
        ours = psutil.Process(first.pid).children(recursive=True)  # Ray's processes for this search
        finished_results = {t: _result_lines(exp, t) for t in finished}
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and its process group
        first.wait()
        log.close()
    # The cluster's guard (infra/guard.py) ends what the driver's death leaves (the agents lived
    # ~60 s more without it): every process the search started is gone within 20 s.
    t0 = time.monotonic()
    _, alive = psutil.wait_procs(ours, timeout=20)
    survivors = _end_processes(alive)
    print(f"killed with {len(finished)} finished of {len(state)} started ({len(midway)} had reported); the "
          f"search's {len(ours)} processes ended in {time.monotonic() - t0:.1f} s; survivors: {survivors}")
    assert not survivors
    assert not (exp / "trials.csv").exists()

    second = _cli(*args, "--resume", timeout=480)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    trials = pd.read_csv(exp / "trials.csv").set_index("trial_id")
    assert len(trials) == num_samples and trials.index.is_unique
    assert (trials["status"] == "completed").all(), trials["status"]
    assert (trials["steps"] == max_steps).all()
    assert not trials.duplicated(list(PARAMS)).any()  # no trial ran twice under another id
    # None lost: every trial started before the kill is in the table, with the same parameters;
    # the finished ones kept their results and were not run again.
    assert set(state) <= set(trials.index)
    for tid, s in state.items():
        for k in PARAMS:
            assert _close(trials.loc[tid, k], s["config"][k]), (tid, k)
    for tid, lines in finished_results.items():
        assert _result_lines(exp, tid) == lines
        assert trials.loc[tid, "objective_value"] == pytest.approx(finished[tid]["last_result"]["eval/success_rate"])
    curves = pd.read_csv(exp / "curves.csv")
    assert not curves.duplicated(["trial_id", "step"]).any()
    assert sorted(curves.groupby("trial_id")["step"].apply(sorted).map(tuple).unique()) == [(0, max_steps // 2, max_steps)]
    # The restored searcher went on from where it was: exactly num_samples Optuna trials.
    study, numbers = _optuna_study(exp)
    assert len(study.trials) == num_samples and set(numbers) == set(trials.index)
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    # The study Optuna's own tools open (its SQLite file survived the SIGKILL) continued too: one
    # trial per Tune trial, every one finished with its final value, none left RUNNING.
    import optuna

    recorded = json.loads((exp / "search.json").read_text())["search"]["optuna_study"]
    db = optuna.load_study(study_name=recorded["name"], storage=recorded["storage"])
    by_id = {t.user_attrs["trial_id"]: t for t in db.trials}
    assert len(db.trials) == num_samples and set(by_id) == set(trials.index)
    for tid, t in by_id.items():
        assert t.state.name == "COMPLETE" and t.value == pytest.approx(trials.loc[tid, "objective_value"])
        assert sorted(t.intermediate_values) == [0, max_steps // 2, max_steps]
    # search.json is the one written when the search started.
    info = json.loads((exp / "search.json").read_text())
    assert info["num_samples"] == num_samples and info["name"] == "resume"


# ------------------------------------------------------------------------------------------
# Two Ray nodes, one trial of two workers spread over both
# ------------------------------------------------------------------------------------------

MULTINODE_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from simpo_ray.search.run import run_search

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        exp = run_search(sys.argv[1], storage_path=sys.argv[2], name="multinode",
                         address=cluster.address, verbose=0)
        from ray._private.state import actors
        nodes = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
        workers = [a["Address"]["NodeID"] for a in actors().values()
                   if a["ActorClassName"] == "RayTrainWorker"]
        print("RESULT " + json.dumps({"exp": str(exp), "nodes": nodes, "workers": workers}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.slow
def test_two_worker_trial_spans_two_nodes(tmp_path):
    import psutil

    max_steps, batch = 20, 16
    space = _write_space(tmp_path / "space.yaml",
                         base={"max_steps": max_steps, "eval_steps": 10, "generation_eval_samples": 16,
                               "max_eval_samples": 64, "per_device_train_batch_size": batch},
                         resources={"num_workers": 2, "cpus_per_worker": 1},
                         search={"num_samples": 1, "scheduler": "fifo", "points_to_evaluate": "default_only"})
    script = tmp_path / "multinode.py"
    script.write_text(MULTINODE_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(space), str(tmp_path / "results")], cwd=ROOT,
                            env=_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            ours = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _end_processes(ours)
    assert proc.returncode == 0, out[-4000:]
    [line] = [x for x in out.splitlines() if x.startswith("RESULT ")]
    res = json.loads(line[len("RESULT "):])
    # Two nodes of one CPU each: two one-CPU workers can only be placed one per node.
    assert sorted(res["nodes"].values()) == [1.0, 1.0]
    assert len(res["workers"]) == 2 and set(res["workers"]) == set(res["nodes"])
    trials = pd.read_csv(Path(res["exp"]) / "trials.csv")
    assert len(trials) == 1
    t = trials.iloc[0]
    assert t["status"] == "completed" and t["steps"] == max_steps
    # World size 2: every optimizer step consumed one batch on each worker.
    assert t["final_samples"] == max_steps * batch * 2


def test_results_keep_one_report_per_step_after_a_resumed_trial_reran():
    """A trial interrupted by the kill is run again by --resume, and Tune appends the new reports
    to the same result file: the tables keep the re-run's report for a step seen twice."""
    from simpo_ray.search.results import build_tables

    class Rerun:  # the parts of a Tune Result that build_tables reads
        metrics = {"trial_id": "t1", "step": 20, "status": "completed", "eval/success_rate": 0.3}
        config = dict(CPU_DEFAULT)
        path, error = "/nowhere/t1", None
        metrics_dataframe = pd.DataFrame(
            [{"step": 0, "eval/success_rate": 0.25}, {"step": 10, "eval/success_rate": 0.9},  # killed run
             {"step": 0, "eval/success_rate": 0.25}, {"step": 10, "eval/success_rate": 0.1},  # re-run
             {"step": 20, "eval/success_rate": 0.3}])

    trials, curves = build_tables([Rerun()], objective="eval/success_rate", mode="max",
                                  default_point=CPU_DEFAULT, info={})
    assert curves["step"].tolist() == [0, 10, 20]
    assert curves["eval/success_rate"].tolist() == [0.25, 0.1, 0.3]
    # The killed run's 0.9 was never reached by the trial's final run: it must not be its best.
    assert trials.loc[0, "best_objective"] == 0.3 and bool(trials.loc[0, "is_default"])


# ------------------------------------------------------------------------------------------
# --resume with another space; Ctrl-C; the learning curve of a resumed trial
# ------------------------------------------------------------------------------------------


def _stored_search(tmp_path: Path, space: Path, name: str = "kept") -> Path:
    """An experiment directory as a started search leaves it: search.json and Tune's tuner.pkl
    (whose presence is what `Tuner.can_restore` checks; here a whole pickle of nothing, which
    the resume's damage check walks but never loads)."""
    from simpo_ray.search.records import SearchRecord
    from simpo_ray.search.plan import load

    exp = tmp_path / "results" / name
    exp.mkdir(parents=True)
    SearchRecord.from_space(load(space), space, name).write(exp)
    (exp / "tuner.pkl").write_bytes(pickle.dumps({}))
    return exp


def test_resume_with_another_space_is_refused_naming_what_differs(tmp_path, capsys, monkeypatch):
    """The search started on cpu-tiny; `--resume --space cpu-small.yaml` would train trials of
    bundled:small under a search.json of bundled:tiny: refused in one line, before Ray starts.
    A change in num_samples only (the budget) is accepted with a note."""
    import ray

    import simpo_ray.infra.cluster as cluster_mod
    from simpo_ray.cli import tune_main

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(cluster_mod, "init_ray", refuse)
    _stored_search(tmp_path, TINY)
    storage = ["--storage-path", str(tmp_path / "results"), "--name", "kept", "--resume"]
    rc = tune_main(["--space", str(SPACES / "cpu-small.yaml"), *storage])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: --resume: the space differs from the one search 'kept' started with")
    assert "base.model_name_or_path: 'bundled:tiny' -> 'bundled:small'" in err
    assert str(TINY) in err  # the space file it started with

    # A preset changes the resolved ranges: refused too.
    rc = tune_main(["--space", str(TINY), "--task", "math", *storage])
    err = capsys.readouterr().err
    assert rc == 2 and "task: null -> 'math'" in err, err

    # The same space with another num_samples: past the check (to Ray), with a note.
    with pytest.raises(AssertionError, match="Ray was started"):
        tune_main(["--space", str(TINY), "--num-samples", "20", *storage])
    out = capsys.readouterr().out
    assert "note: search.num_samples: 12 -> 20 is not applied" in out


@pytest.mark.slow
def test_ctrl_c_reports_an_interrupted_search_and_resume_keeps_every_curve(tmp_path):
    """SIGINT mid-search: exit 130, the summary says INTERRUPTED and gives the exact --resume
    command, cut trials are `interrupted` (FIFO: no trial is stopped early), search.json says
    the tables are partial, no best_config.yaml. Then `--resume` (with only the budget changed)
    finishes every trial, and a trial that continued from its checkpoint keeps its whole curve,
    each step once. The resumed run, a run without faults, prints no Ray noise."""
    import psutil

    num_samples, max_steps, every = 4, 200, 50
    space = _write_space(tmp_path / "space.yaml",
                         base={"max_steps": max_steps, "eval_steps": every, "generation_eval_samples": 8,
                               "max_eval_samples": 32},
                         search={"num_samples": num_samples, "max_concurrent": 2, "scheduler": "fifo",
                                 "points_to_evaluate": "default_only"})
    storage = tmp_path / "results"
    exp = storage / "cut"
    args = ["--space", str(space), "--storage-path", str(storage), "--name", "cut"]
    env = {**_subprocess_env(), "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    log_path = tmp_path / "first.log"
    log = open(log_path, "w")
    first = subprocess.Popen([sys.executable, "-m", "simpo_ray.tune", *args], cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ours = []
    try:
        deadline = time.monotonic() + 400
        while True:  # interrupt once a trial reported a checkpointed step and is not done
            assert first.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial got half-way in time"
            midway = {t: max(r["step"] for r in reps) for t, reps in _reports(exp).items()
                      if reps and every <= max(r["step"] for r in reps) < max_steps}
            if midway:
                break
            time.sleep(0.25)
        ours = psutil.Process(first.pid).children(recursive=True)
        first.send_signal(signal.SIGINT)  # Ctrl-C (to the driver: Ray's own processes block SIGINT)
        first.wait(timeout=180)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        log.close()
    _end_processes(ours)
    out = log_path.read_text()
    print(out[-2500:])
    assert first.returncode == 130, out[-3000:]
    assert "INTERRUPTED" in out and " finished: " not in out
    resume_line = "resume it with: " + " ".join(["python", "-m", "simpo_ray.tune", *args, "--resume"])
    assert resume_line in out
    trials = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str}).set_index("trial_id")
    assert "stopped_early" not in set(trials["status"])
    assert set(midway) <= set(trials.index[trials["status"] == "interrupted"]), (midway, trials["status"])
    assert trials.loc[trials["status"] == "interrupted", "rank"].isna().all()
    assert json.loads((exp / "search.json").read_text())["state"] == "interrupted"
    assert not (exp / "best_config.yaml").exists()

    second = _cli(*args, "--num-samples", str(num_samples + 1), "--resume", timeout=480)
    text = second.stdout + second.stderr
    assert second.returncode == 0, text[-3000:]
    assert f"note: search.num_samples: {num_samples} -> {num_samples + 1} is not applied" in second.stdout
    trials = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str}).set_index("trial_id")
    assert len(trials) == num_samples and (trials["status"] == "completed").all(), trials["status"]
    assert json.loads((exp / "search.json").read_text())["state"] == "finished"
    curves = pd.read_csv(exp / "curves.csv", dtype={"trial_id": str})
    steps = curves.groupby("trial_id")["step"].apply(list).to_dict()
    assert steps == {t: list(range(0, max_steps + 1, every)) for t in trials.index}, steps
    # Tune's own result file of a trial that continued from its checkpoint starts after it:
    # the steps before come from the trial's Train history.
    restarted = {t: (json.loads(lines[0])["step"] if (lines := _result_lines(exp, t)) else None) for t in midway}
    print("first step in Tune's result file after the resume:", restarted)
    assert any(first_step is None or first_step > 0 for first_step in restarted.values()), restarted
    assert "(raylet)" not in text and "Traceback" not in text, text[-3000:]
