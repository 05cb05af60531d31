"""Failure and recovery on the bundled task: worker crashes, errored trials, atomic writes,
checkpoint retention, a 100-trial stress search, and safe defaults (YAML, remote code, Ray).

Every Ray test uses the shared 2-CPU session cluster (`ray_cluster` in conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from simpo_ray.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY_SPACE = ROOT / "search_spaces" / "cpu-tiny.yaml"
TRAIN_ACTORS = ("TrainController", "RayTrainWorker", "PlacementGroupCleaner", "SynchronizationActor",
                "PreemptionWatcher")
# A small, fast single-worker run of the bundled task.
BASE = dict(model_name_or_path="bundled:tiny", dataset_mixer={"bundled:sort": 1.0}, max_length=64,
            max_prompt_length=32, max_eval_samples=32, per_device_train_batch_size=8,
            per_device_eval_batch_size=32, generation_eval_samples=8, learning_rate=1e-3, sft_weight=0.5)


def _history(run_dir: Path) -> list[dict]:
    from simpo_ray.launch import read_history

    path = run_dir / "history.jsonl"
    return read_history(path) if path.exists() else []


def _checkpoint_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))


def _assert_cluster_clean(timeout_s: float = 30) -> None:
    """All CPUs back, no live Train helper actors, no live placement groups."""
    import gc

    import ray
    from ray._private.state import actors

    from simpo_ray.ray_workarounds import resources_settled

    gc.collect()  # actor handles held by garbage cycles keep their actors alive

    assert resources_settled(timeout_s=timeout_s), (ray.available_resources(), ray.cluster_resources())
    leftovers = ["?"]
    deadline = time.monotonic() + timeout_s
    while leftovers and time.monotonic() < deadline:
        leftovers = sorted(a["ActorClassName"] for a in actors().values()
                           if a["State"] == "ALIVE" and a["ActorClassName"] in TRAIN_ACTORS)
        if leftovers:
            time.sleep(0.5)
    assert leftovers == []
    live_pgs = [p for p in ray.util.placement_group_table().values() if p["state"] != "REMOVED"]
    assert live_pgs == []


# ------------------------------------------------------------------------------ stress


STRESS_TRIALS = 100
STRESS_OVERRIDES = {
    "base.max_steps": 4, "base.eval_steps": 2, "base.logging_steps": 2, "base.max_eval_samples": 32,
    "base.generation_eval_samples": 8, "base.per_device_train_batch_size": 8,
    "search.scheduler": "asha", "search.time_attr": "step", "search.grace_period": 2,
    "search.reduction_factor": 2, "search.max_t": 4, "search.checkpoint_keep": 1,
}


@pytest.mark.stress
def test_stress_100_trials_complete_without_leaks(ray_cluster, tmp_path):
    """100 short trials, 2 at a time on 2 CPUs: all finish, nothing leaks, all CPUs come back."""
    from simpo_ray.tune import run_search

    t0 = time.monotonic()
    exp = run_search(TINY_SPACE, storage_path=str(tmp_path), name="stress", num_samples=STRESS_TRIALS,
                     seed=0, overrides=STRESS_OVERRIDES, verbose=0)
    wall = time.monotonic() - t0
    trials = pd.read_csv(exp / "trials.csv")
    print(f"\n[stress] {STRESS_TRIALS} trials in {wall:.0f}s ({wall / STRESS_TRIALS:.1f}s per trial); "
          f"statuses: {trials['status'].value_counts().to_dict()}")
    assert len(trials) == STRESS_TRIALS
    assert trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"completed", "stopped_early"}, trials[trials["status"] == "errored"]["error"]
    assert (trials["status"] == "completed").any()
    _assert_cluster_clean()


# ------------------------------------------------------------------------------ atomic writes


def _fail_writes_to(monkeypatch, name: str | None = None) -> None:
    """Make the write of `name` (any file when None) crash after part of it reached the disk."""
    real_fsync = os.fsync

    def crashing_fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if name is None or Path(target).name.startswith(f".{name}."):
            raise OSError(28, "No space left on device (simulated crash mid-write)")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", crashing_fsync)


def _stray_temp_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def test_write_text_atomic_crash_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    from simpo_ray.io import write_text_atomic

    target = tmp_path / "trials.csv"
    write_text_atomic(target, "old,content\n1,2\n")
    _fail_writes_to(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        write_text_atomic(target, "new,content\n" + "3,4\n" * 100_000)
    assert target.read_text() == "old,content\n1,2\n"
    assert _stray_temp_files(tmp_path) == []
    # A crash in the rename itself: same guarantee.
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError):
        write_text_atomic(target, "newer\n")
    assert target.read_text() == "old,content\n1,2\n"
    assert _stray_temp_files(tmp_path) == []
    monkeypatch.undo()
    write_text_atomic(target, "newest\n")  # and a healthy write replaces it
    assert target.read_text() == "newest\n"


class _FakeResult:
    """The parts of a Ray Tune `Result` that results.build_tables reads."""

    def __init__(self, trial_id: str, lr: float, value: float):
        self.metrics = {"trial_id": trial_id, "step": 4, "status": "completed", "eval/success_rate": value,
                        "total_steps": 4}
        self.config = {"learning_rate": lr, "beta": 2.0, "gamma_beta_ratio": 0.5, "sft_weight": 0.5}
        self.path = f"/nonexistent/{trial_id}"
        self.error = None
        self.metrics_dataframe = pd.DataFrame(
            [{"step": 0, "samples": 0, "tokens": 0, "eval/success_rate": 0.1},
             {"step": 4, "samples": 32, "tokens": 900, "eval/success_rate": value}])


def test_search_outputs_survive_a_crash_while_being_rewritten(tmp_path, monkeypatch):
    """trials.csv, curves.csv, best_config.yaml and search.json: a crash while rewriting any one
    of them (e.g. a resumed search finishing) leaves the previous version intact and readable."""
    import dataclasses

    from simpo_ray.records import SearchRecord
    from simpo_ray.results import finish
    from simpo_ray.space import load_space

    space = load_space(TINY_SPACE)
    exp = tmp_path / "exp"
    record = SearchRecord.from_space(space, TINY_SPACE, "exp")
    record.write(str(exp))
    finish([_FakeResult("t1", 1e-3, 0.5), _FakeResult("t2", 2e-3, 0.6)], space, str(exp), record, verbose=0)
    before = {n: (exp / n).read_text() for n in ("trials.csv", "curves.csv", "best_config.yaml", "search.json")}
    assert "learning_rate: 0.002" in before["best_config.yaml"]

    newer = [_FakeResult("t1", 1e-3, 0.5), _FakeResult("t2", 2e-3, 0.6), _FakeResult("t3", 3e-3, 0.9)]
    for name in before:
        monkeypatch.undo()
        _fail_writes_to(monkeypatch, name)
        with pytest.raises(OSError, match="simulated crash"):
            if name == "search.json":
                dataclasses.replace(record, num_samples=3).write(str(exp))
            else:
                finish(newer, space, str(exp), record, verbose=0)
        assert (exp / name).read_text() == before[name], name
        assert _stray_temp_files(exp) == [], name
    monkeypatch.undo()
    # Each file is replaced whole or not at all (the files are not one transaction: a crash
    # on curves.csv comes after trials.csv was already replaced), so every one still parses.
    assert len(pd.read_csv(exp / "trials.csv")) in (2, 3)
    assert len(pd.read_csv(exp / "curves.csv")) in (4, 6)
    assert yaml.safe_load((exp / "best_config.yaml").read_text())["learning_rate"] in (2e-3, 3e-3)
    assert json.loads((exp / "search.json").read_text())["name"] == "exp"


def test_history_with_a_line_cut_by_a_crash_is_still_readable(tmp_path):
    from simpo_ray.launch import read_history

    path = tmp_path / "history.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 4, "lo')
    assert [r["step"] for r in read_history(path)] == [0, 2]


# ------------------------------------------------------------------------------ Train fault tolerance


def _my_train_workers() -> list:
    """RayTrainWorker processes of THIS test session's Ray cluster (descendants of this process:
    the local raylet is our child, its workers our grandchildren) — never another user's."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_killed_worker_restarts_from_its_checkpoint_and_finishes(ray_cluster, tmp_path):
    import threading

    from simpo_ray.launch import final_metrics, run_training

    max_steps, every = 60, 4
    cfg = TrainConfig(**BASE, max_steps=max_steps, eval_steps=every, save_total_limit=2)
    run_dir = tmp_path / "killed"
    killed: dict = {}

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            rows = _history(run_dir)
            if any(r["step"] >= every for r in rows):  # the first checkpointed report is in
                workers = _my_train_workers()
                if len(workers) == 1:
                    killed["pid"], killed["after_step"] = workers[0].pid, rows[-1]["step"]
                    os.kill(workers[0].pid, signal.SIGKILL)
                    return
                killed.setdefault("ambiguous", [w.pid for w in workers])
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    result = run_training(cfg, num_workers=1, storage_path=str(tmp_path), name="killed", max_failures=1)
    watcher.join(timeout=5)

    assert "pid" in killed, f"no worker was killed: {killed}"
    assert killed["after_step"] < max_steps, "the run finished before the kill; make it longer"
    assert result.error is None, result.error
    rows = _history(run_dir)
    steps = [r["step"] for r in rows]
    final = final_metrics(result)
    assert final["status"] == "completed" and final["step"] == max_steps
    assert final["restarts"] == 1
    assert steps.count(0) == 1, steps  # the baseline eval is not repeated on resume
    resumed = [r for r in rows if r.get("restarts") == 1]
    before = [r for r in rows if r.get("restarts", 0) == 0]
    assert resumed and before
    # The restarted attempt continues from a checkpoint of the first attempt (a multiple of
    # save_steps at or before the kill), not from step 0.
    first_after = resumed[0]["step"]
    assert every < first_after <= killed["after_step"] + every, (steps, killed)
    assert (first_after - every) % every == 0
    assert [r["step"] for r in resumed] == list(range(first_after, max_steps + 1, every))
    # Its counters continue too: samples keep growing from the checkpoint's.
    assert resumed[0]["samples"] == first_after * cfg.per_device_train_batch_size
    _assert_cluster_clean()


def test_worker_failure_beyond_max_failures_is_an_error(ray_cluster, tmp_path):
    """max_failures=0 (a search's search.max_failures: 0): the same kill fails the run cleanly."""
    import threading

    import ray.train

    from simpo_ray.launch import run_training

    cfg = TrainConfig(**BASE, max_steps=60, eval_steps=4)
    run_dir = tmp_path / "fatal"

    def kill_once():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if _history(run_dir):
                workers = _my_train_workers()
                if len(workers) == 1:
                    os.kill(workers[0].pid, signal.SIGKILL)
                    return
            time.sleep(0.05)

    threading.Thread(target=kill_once, daemon=True).start()
    with pytest.raises(ray.train.TrainingFailedError, match="RayTrainWorker"):
        run_training(cfg, num_workers=1, storage_path=str(tmp_path), name="fatal", max_failures=0)
    assert max(r["step"] for r in _history(run_dir)) < 60
    _assert_cluster_clean()


# ------------------------------------------------------------------------------ checkpoint retention


def _checkpoint_steps(run_dir: Path) -> dict[str, int]:
    import torch

    out = {}
    for name in _checkpoint_dirs(run_dir):
        state = torch.load(run_dir / name / "trainer_state.pt", map_location="cpu", weights_only=False)
        out[name] = state["counters"]["step"]
    return out


def test_checkpoint_retention_keeps_save_total_limit(ray_cluster, tmp_path):
    from simpo_ray.launch import run_training

    # 5 checkpoints (steps 2, 4, 6, 8, 10); save_total_limit 2 keeps the 2 most recent.
    cfg = TrainConfig(**BASE, max_steps=10, eval_steps=2, save_total_limit=2)
    result = run_training(cfg, num_workers=1, storage_path=str(tmp_path), name="keep2")
    assert result.error is None
    assert sorted(r["step"] for r in _history(tmp_path / "keep2") if r["step"]) == [2, 4, 6, 8, 10]
    kept = _checkpoint_steps(tmp_path / "keep2")
    assert sorted(kept.values()) == [8, 10], kept
    _assert_cluster_clean()  # incl. no TrainController left behind by a standalone fit()


def test_checkpoint_retention_by_score_keeps_the_best(ray_cluster, tmp_path):
    """With checkpoint_score_attribute (the search objective) the best N are kept, plus the
    latest (which a restart resumes from)."""
    from simpo_ray.launch import run_training

    metric = "eval/preference_accuracy"
    cfg = TrainConfig(**BASE, max_steps=10, eval_steps=2, save_total_limit=2)
    result = run_training(cfg, num_workers=1, storage_path=str(tmp_path), name="best2",
                          checkpoint_score_attribute=metric, checkpoint_score_order="max")
    assert result.error is None
    score = {r["step"]: r[metric] for r in _history(tmp_path / "best2") if r["step"]}
    kept = set(_checkpoint_steps(tmp_path / "best2").values())
    assert 10 in kept and 2 <= len(kept) <= 3, kept
    pruned = set(score) - kept
    assert len(pruned) >= 2
    best_kept = sorted(score[s] for s in kept if s != 10)
    assert all(score[p] <= min(best_kept + [score[10]] if len(kept) == 2 else best_kept) for p in pruned), (score, kept)


def test_search_keeps_the_best_checkpoints_by_objective_and_reports_the_best_one(ray_cluster, tmp_path):
    """In a search, each trial keeps `search.checkpoint_keep` checkpoints chosen by the search
    objective, plus its latest; trials.csv names the kept checkpoint of the best report."""
    import torch

    from simpo_ray.tune import run_search

    metric = "eval/preference_accuracy"
    overrides = {"base.max_steps": 12, "base.eval_steps": 2, "base.logging_steps": 2,
                 "base.max_eval_samples": 64, "base.generation_eval_samples": 8,
                 "base.per_device_train_batch_size": 8, "search.scheduler": "fifo",
                 "search.objective": metric, "search.checkpoint_keep": 1}
    exp = run_search(TINY_SPACE, storage_path=str(tmp_path), name="keep-best", num_samples=2, seed=3,
                     overrides=overrides, verbose=0)
    trials = pd.read_csv(exp / "trials.csv", keep_default_na=False)
    curves = pd.read_csv(exp / "curves.csv")
    assert set(trials["status"]) == {"completed"}
    for _, t in trials.iterrows():
        c = curves[(curves["trial_id"] == t["trial_id"]) & (curves["step"] > 0)]
        score = dict(zip(c["step"], c[metric]))
        run_dir = exp / "train_runs" / f"train-{t['trial_id']}"
        kept = set(_checkpoint_steps(run_dir).values())
        top = max(score.values())
        latest_best = max(s for s, v in score.items() if v == top)
        # the best (latest among equals) and the latest (12); nothing else survives.
        assert kept == {latest_best, 12}, (score, kept)
        assert t["best_objective"] == pytest.approx(top)
        assert int(float(t["best_step"])) == latest_best
        state = torch.load(Path(t["best_checkpoint"]) / "trainer_state.pt", map_location="cpu",
                           weights_only=False)
        assert state["counters"]["step"] == latest_best
    _assert_cluster_clean()


# ------------------------------------------------------------------------------ errored trials


def test_a_trial_that_raises_is_recorded_as_errored_and_the_search_goes_on(ray_cluster, tmp_path):
    """A point that passes the space's validation (--allow-out-of-range) but is not a valid
    training config (gamma_beta_ratio < 0): its trial raises; the others run to the end."""
    from simpo_ray.tune import run_search

    space = yaml.safe_load(TINY_SPACE.read_text())
    space["base"].update(max_steps=4, eval_steps=2, max_eval_samples=32, generation_eval_samples=8,
                         per_device_train_batch_size=8)
    # All four searched (results.summary_table needs all four columns; see the xfail below).
    space["params"] = {"learning_rate": {"distribution": "loguniform", "low": 1e-3, "high": 1.1e-3},
                       "beta": {"distribution": "uniform", "low": 2.0, "high": 2.5},
                       "gamma_beta_ratio": {"distribution": "uniform", "low": -1.0, "high": 1.0},
                       "sft_weight": {"distribution": "uniform", "low": 0.4, "high": 0.6}}
    space["search"].update(num_samples=3, scheduler="fifo", max_t=4, grace_period=2,
                           points_to_evaluate={"references": False, "extra": [{"gamma_beta_ratio": -0.5}]})
    path = tmp_path / "bad-point.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    exp = run_search(path, storage_path=str(tmp_path / "results"), name="bad-point", allow_out_of_range=True,
                     verbose=0)
    trials = pd.read_csv(exp / "trials.csv", keep_default_na=False)
    assert len(trials) == 3
    bad = trials[trials["gamma_beta_ratio"] < 0]
    good = trials[trials["gamma_beta_ratio"] >= 0]
    assert -0.5 in set(bad["gamma_beta_ratio"])
    assert set(bad["status"]) == {"errored"}
    for message in bad["error"]:
        assert "gamma_beta_ratio" in message and "out of range" in message, message
    assert len(good) >= 1 and set(good["status"]) == {"completed"}
    assert (good["error"] == "").all()
    assert (good["steps"] == 4).all()
    best = yaml.safe_load((exp / "best_config.yaml").read_text())
    assert best["gamma_beta_ratio"] >= 0
    _assert_cluster_clean()


def test_summary_table_of_a_search_over_a_subset_of_the_parameters():
    from simpo_ray.results import summary_table

    trials = pd.DataFrame([{"trial_id": "t1", "status": "completed", "is_default": True, "beta": 2.0,
                            "steps": 4, "best_objective": 0.5}])
    table = summary_table(trials, "max")
    assert "| 1 | t1 (default) | completed | - | 2 | - | - | 4 | 0.5000 |" in table


# ------------------------------------------------------------------------------ safe defaults


def test_yaml_is_only_ever_read_with_the_safe_loader():
    unsafe = re.compile(r"yaml\.(load|load_all|unsafe_load|unsafe_load_all|full_load|full_load_all)\s*\("
                        r"|Loader\s*=\s*yaml\.(Loader|FullLoader|UnsafeLoader)|yaml\.(Unsafe|Full)?Loader\b")
    offenders = []
    files = [*(ROOT / "simpo_ray").rglob("*.py"), *(ROOT / "analysis").rglob("*.py"),
             *(ROOT / "analysis").rglob("*.ipynb")]
    assert len(files) > 10
    for path in files:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if unsafe.search(line) and "SafeLoader" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert offenders == []


def test_trust_remote_code_is_off_unless_set_and_is_passed_through(tmp_path, monkeypatch):
    import simpo_ray.model as model_mod
    from simpo_ray.config import load_train_config

    assert TrainConfig().trust_remote_code is False
    assert load_train_config({}).trust_remote_code is False
    seen = []

    class Recorder:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.append(kwargs.get("trust_remote_code", "missing"))
            raise OSError("stop here")

    monkeypatch.setattr(model_mod, "AutoModelForCausalLM", Recorder)
    monkeypatch.setattr(model_mod, "AutoTokenizer", Recorder)
    for flag in (False, True):
        cfg = TrainConfig(model_name_or_path=str(tmp_path), trust_remote_code=flag)
        for load in (model_mod.load_model, model_mod.load_tokenizer):
            with pytest.raises(model_mod.UserError):
                load(cfg)
    assert seen == [False, False, True, True]


def test_ray_starts_without_a_dashboard(ray_cluster):
    """init_ray (what the CLIs and the tests use) starts no dashboard: no web UI URL, nothing
    listening on the dashboard port; the ports our local cluster binds are listed for the notes."""
    import psutil
    import ray
    from ray._private import worker

    assert ray.is_initialized()
    node = worker._global_node
    assert not node.address_info.get("webui_url"), node.address_info.get("webui_url")
    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    listening = set()
    for proc in procs:
        try:
            names = " ".join(proc.cmdline())[:60]
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening.add((conn.laddr.ip, conn.laddr.port, names.split()[0] if names else "?"))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    print("\n[ports] listening:", sorted(listening))
    assert not any(port == 8265 for _, port, _ in listening)
    assert not any("dashboard" in name for *_, name in listening)
