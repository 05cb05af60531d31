"""Failure and recovery on the bundled task: worker crashes, errored trials, atomic writes,
checkpoint retention, a 100-trial stress search, and safe defaults (YAML, remote code, Ray).

Every Ray test uses the shared 2-CPU session cluster (`ray_cluster` in conftest.py).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ray_helpers import live_train_worker_pids

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
    from simpo_ray.infra.launch import read_history

    path = run_dir / "history.jsonl"
    return read_history(path) if path.exists() else []


def _is_loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # [::ffff:127.0.0.1]
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def _listening_sockets() -> set[tuple[str, int, str]]:
    """(ip, port, process) of every listening TCP socket of this process and its descendants:
    the driver, and the session cluster's GCS, raylet, agents and Ray workers."""
    import psutil

    found = set()
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            name = (" ".join(proc.cmdline()) or proc.name()).split()[0][-40:]
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, name))
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            pass
    return found


class _ListeningWatch:
    """Polls `_listening_sockets` in a thread while a search runs (`with _ListeningWatch() as w:`)."""

    def __init__(self, every_s: float = 0.5) -> None:
        import threading

        self.seen: set[tuple[str, int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            self.seen |= _listening_sockets()
            self._stop.wait(every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.seen |= _listening_sockets()


def _kill_when(done, killed: dict, rows, ready, pids) -> None:
    """Every 50 ms until `done`: once `ready(rows())`, SIGKILL the one process `pids()` names and
    record its pid and the last reported step in `killed` (several: recorded as ambiguous, retried)."""
    while not done.wait(0.05):
        found = rows()
        if ready(found):
            live = pids()
            if len(live) == 1:
                killed["pid"], killed["after_step"] = live[0], found[-1]["step"]
                os.kill(live[0], signal.SIGKILL)
                return
            killed.setdefault("ambiguous", live)


def _checkpoint_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))


def _assert_cluster_clean(timeout_s: float = 30) -> None:
    """All CPUs back, no live Train helper actors, no live placement groups."""
    import gc

    import ray
    from ray._private.state import actors

    from ray_helpers import resources_settled

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
@pytest.mark.slow
def test_stress_100_trials_complete_without_leaks(ray_cluster, tmp_path):
    """100 short trials, 2 at a time on 2 CPUs: all finish, nothing leaks, all CPUs come back."""
    from simpo_ray.search.run import run_search

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

    from simpo_ray.search.records import SearchRecord
    from simpo_ray.search.results import finish
    from simpo_ray.search.plan import load

    space = load(TINY_SPACE)
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
    from simpo_ray.infra.launch import read_history

    path = tmp_path / "history.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 4, "lo')
    assert [r["step"] for r in read_history(path)] == [0, 2]


# ------------------------------------------------------------------------------ Train fault tolerance


@pytest.mark.slow
def test_killed_worker_restarts_from_its_checkpoint_and_finishes(ray_cluster, tmp_path):
    import threading

    from simpo_ray.infra.launch import final_metrics, run_training

    max_steps, every = 60, 4
    cfg = TrainConfig(**BASE, max_steps=max_steps, eval_steps=every, save_total_limit=2)
    run_dir = tmp_path / "killed"
    killed: dict = {}
    done = threading.Event()
    # once the first checkpointed report is in
    watcher = threading.Thread(target=_kill_when, daemon=True, args=(
        done, killed, lambda: _history(run_dir), lambda rows: any(r["step"] >= every for r in rows),
        live_train_worker_pids))
    watcher.start()
    try:
        result = run_training(cfg, num_workers=1, storage_path=str(tmp_path), name="killed", max_failures=1)
    finally:
        done.set()
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


@pytest.mark.slow
def test_a_killed_in_process_trial_restarts_from_its_checkpoint_and_finishes(ray_cluster, tmp_path):
    """A single-worker search trial trains in its Tune trial's process (infra/local_run.py). SIGKILL
    that process after its first checkpoint: Tune restarts the trial (search.max_failures: 1), which
    resumes from that checkpoint; the search records it completed, one restart, every step once."""
    import threading

    from ray._private.state import actors

    from simpo_ray.search.run import run_search

    max_steps, every = 48, 4
    overrides = {"base.max_steps": max_steps, "base.eval_steps": every, "base.logging_steps": every,
                 "base.max_eval_samples": 32, "base.generation_eval_samples": 8,
                 "base.per_device_train_batch_size": 8, "search.scheduler": "fifo", "search.max_failures": 1,
                 "search.checkpoint_keep": 1}
    exp_dir = tmp_path / "killed-trial"
    killed: dict = {}
    done = threading.Event()

    def rows():
        runs = list((exp_dir / "train_runs").glob("train-*"))
        return _history(runs[0]) if runs else []

    def trial_pids():
        return [a["Pid"] for a in actors().values()
                if a["State"] == "ALIVE" and a["ActorClassName"] == "ImplicitFunc" and a.get("Pid")]

    watcher = threading.Thread(target=_kill_when, daemon=True, args=(
        done, killed, rows, lambda found: any(r["step"] >= every and r.get("checkpoint_path") for r in found),
        trial_pids))
    watcher.start()
    try:
        exp = run_search(TINY_SPACE, storage_path=str(tmp_path), name="killed-trial", num_samples=1,
                         overrides=overrides, verbose=0)
    finally:
        done.set()
        watcher.join(timeout=5)

    assert "pid" in killed, f"no trial was killed: {killed}"
    assert killed["after_step"] < max_steps, "the trial finished before the kill; make it longer"
    trials = pd.read_csv(exp / "trials.csv", keep_default_na=False)
    assert list(trials["status"]) == ["completed"] and int(trials["steps"].iloc[0]) == max_steps
    rows = _history(next((exp / "train_runs").glob("train-*")))
    steps = [r["step"] for r in rows]
    assert steps.count(0) == 1, steps
    resumed = [r for r in rows if r.get("restarts") == 1]
    assert resumed and rows[-1]["restarts"] == 1 and rows[-1]["status"] == "completed"
    first_after = resumed[0]["step"]
    assert every < first_after <= killed["after_step"] + every, (steps, killed)
    assert [r["step"] for r in resumed] == list(range(first_after, max_steps + 1, every))
    assert resumed[0]["samples"] == first_after * 8
    curves = pd.read_csv(exp / "curves.csv")
    assert sorted(curves["step"]) == list(range(0, max_steps + 1, every))  # each step once
    _assert_cluster_clean()


@pytest.mark.slow
def test_worker_failure_beyond_max_failures_is_an_error(ray_cluster, tmp_path):
    """max_failures=0 (a search's search.max_failures: 0): the same kill fails the run cleanly."""
    import threading

    import ray.train

    from simpo_ray.infra.launch import run_training

    cfg = TrainConfig(**BASE, max_steps=60, eval_steps=4)
    run_dir = tmp_path / "fatal"

    done = threading.Event()

    def kill_once():
        while not done.wait(0.05):
            if _history(run_dir):
                workers = live_train_worker_pids()
                if len(workers) == 1:
                    os.kill(workers[0], signal.SIGKILL)
                    return

    watcher = threading.Thread(target=kill_once, daemon=True)
    watcher.start()
    try:
        with pytest.raises(ray.train.TrainingFailedError, match="RayTrainWorker"):
            run_training(cfg, num_workers=1, storage_path=str(tmp_path), name="fatal", max_failures=0)
    finally:
        done.set()
        watcher.join(timeout=5)
    assert max(r["step"] for r in _history(run_dir)) < 60
    _assert_cluster_clean()


# ------------------------------------------------------------------------------ checkpoint retention


def _checkpoint_steps(run_dir: Path) -> dict[str, int]:
    import json

    out = {}
    for name in _checkpoint_dirs(run_dir):
        state = json.loads((run_dir / name / "trainer_state.json").read_text())
        out[name] = state["counters"]["step"]
    return out


@pytest.mark.slow
def test_checkpoint_retention_keeps_save_total_limit(ray_cluster, tmp_path):
    from simpo_ray.infra.launch import run_training

    # 5 checkpoints (steps 2, 4, 6, 8, 10); save_total_limit 2 keeps the 2 most recent.
    cfg = TrainConfig(**BASE, max_steps=10, eval_steps=2, save_total_limit=2)
    result = run_training(cfg, num_workers=1, storage_path=str(tmp_path), name="keep2")
    assert result.error is None
    assert sorted(r["step"] for r in _history(tmp_path / "keep2") if r["step"]) == [2, 4, 6, 8, 10]
    kept = _checkpoint_steps(tmp_path / "keep2")
    assert sorted(kept.values()) == [8, 10], kept
    _assert_cluster_clean()  # incl. no TrainController left behind by a standalone fit()


@pytest.mark.slow
def test_checkpoint_retention_by_score_keeps_the_best(ray_cluster, tmp_path):
    """With checkpoint_score_attribute (the search objective) the best N are kept, plus the
    latest (which a restart resumes from)."""
    from simpo_ray.infra.launch import run_training

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


@pytest.mark.slow
def test_search_keeps_the_best_checkpoints_by_objective_and_reports_the_best_one(ray_cluster, tmp_path):
    """In a search, each trial keeps `search.checkpoint_keep` checkpoints chosen by the search
    objective, plus its latest; trials.csv names the kept checkpoint of the best report."""

    from simpo_ray.search.run import run_search

    metric = "eval/preference_accuracy"
    overrides = {"base.max_steps": 12, "base.eval_steps": 2, "base.logging_steps": 2,
                 "base.max_eval_samples": 64, "base.generation_eval_samples": 8,
                 "base.per_device_train_batch_size": 8, "search.scheduler": "fifo",
                 "search.objective": metric, "search.checkpoint_keep": 1}
    with _ListeningWatch() as watch:  # issue 15, item 10: the private cluster is on loopback only
        exp = run_search(TINY_SPACE, storage_path=str(tmp_path), name="keep-best", num_samples=2, seed=3,
                         overrides=overrides, verbose=0)
    exposed = sorted(s for s in watch.seen if not _is_loopback(s[0]))
    assert exposed == [], f"listening beyond loopback during a search: {exposed}"
    names = {name for *_, name in watch.seen}
    assert any("ray::" in n for n in names) and any("raylet" in n for n in names), names
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
        state = json.loads((Path(t["best_checkpoint"]) / "trainer_state.json").read_text())
        assert state["counters"]["step"] == latest_best
    _assert_cluster_clean()


# ------------------------------------------------------------------------------ errored trials


@pytest.mark.slow
def test_a_trial_that_raises_is_recorded_as_errored_and_the_search_goes_on(ray_cluster, tmp_path):
    """A point that passes the space's validation (--allow-out-of-range) but is not a valid
    training config (gamma_beta_ratio < 0): its trial raises; the others run to the end."""
    from simpo_ray.search.run import run_search

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
    from simpo_ray.search.results import summary_table

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
    import simpo_ray.train.model as model_mod
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


@pytest.mark.slow
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
    # The private cluster is reachable from this machine only (issue 15, item 10).
    assert listening and all(_is_loopback(ip) for ip, *_ in listening), sorted(listening)


# ------------------------------------------------------------------------------ one search per experiment


HOLD_LOCK = """
import sys, time
from simpo_ray.search.lock import ExperimentLock
lock = ExperimentLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def _hold_lock_in_a_subprocess(exp_path: str):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, exp_path], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _refuse_ray(monkeypatch) -> None:
    import ray

    import simpo_ray.infra.cluster as cluster

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(cluster, "init_ray", refuse)


def test_a_second_search_on_a_locked_experiment_is_refused_naming_the_holder(tmp_path, monkeypatch):
    """Another process holds the experiment (as a running search does): a search of the same
    storage path and name stops before Ray starts, with one line naming host, PID and since when.
    Once the holder is gone (SIGKILL: the kernel drops its lock), the experiment is free again."""
    import socket

    from simpo_ray.errors import UserError
    from simpo_ray.search.run import run_search

    storage = tmp_path / "results"
    holder = _hold_lock_in_a_subprocess(str(storage / "busy"))
    try:
        _refuse_ray(monkeypatch)
        with pytest.raises(UserError) as info:
            run_search(TINY_SPACE, storage_path=str(storage), name="busy", verbose=0)
        message = str(info.value)
        assert "\n" not in message
        assert f"{storage / 'busy'} is in use by another search" in message
        assert f"host {socket.gethostname()}, PID {holder.pid}, since 20" in message
        assert "--name" in message
        # A --resume is refused the same way (it must not restore a search that is running).
        (storage / "busy" / "tuner.pkl").write_bytes(pickle.dumps({}))  # what Tune's can_restore looks for
        with pytest.raises(UserError, match="in use by another search"):
            run_search(TINY_SPACE, storage_path=str(storage), name="busy", resume=True, verbose=0)
        (storage / "busy" / "tuner.pkl").unlink()
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(AssertionError, match="Ray was started"):  # past the lock: free again
        run_search(TINY_SPACE, storage_path=str(storage), name="busy", verbose=0)


def test_object_store_lease_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    """On URIs the lock is a lease object with owner, host, PID and heartbeat (here on a file://
    URI, which goes through the same pyarrow code as s3:// and gs://)."""
    import json
    import socket
    import subprocess
    import sys

    from simpo_ray.errors import UserError
    from simpo_ray.search.lock import LEASE_FILE, ExperimentLock

    uri = f"file://{tmp_path}/exp"
    lease = tmp_path / "exp" / LEASE_FILE
    first = ExperimentLock(uri, settle_s=0.05, heartbeat_s=0.2)
    first.acquire()
    try:
        held = json.loads(lease.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["token"]
        beat = held["heartbeat"]
        time.sleep(0.6)
        assert json.loads(lease.read_text())["heartbeat"] > beat  # the heartbeat runs
        with pytest.raises(UserError, match=rf"in use by another search \(host {socket.gethostname()}, "
                                            rf"PID {os.getpid()}, since .*last heartbeat \d+s ago"):
            ExperimentLock(uri, settle_s=0.05).acquire()
    finally:
        first.release()
    assert not lease.exists()  # released: removed

    # A lease whose heartbeat stopped long ago (its search died elsewhere) is taken over.
    lease.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "2026-01-01 00:00:00", "token": "t",
                                 "heartbeat": time.time() - 3600}))
    taker = ExperimentLock(uri, settle_s=0.05)
    taker.acquire()
    assert json.loads(lease.read_text())["token"] == taker.holder.token
    taker.release()
    # A fresh lease of a process on this host that no longer exists is taken over at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": "now",
                                 "token": "t", "heartbeat": time.time()}))
    taker = ExperimentLock(uri, settle_s=0.05)
    taker.acquire()
    taker.release()
    # A fresh lease of another host is live: refused, naming it.
    lease.write_text(json.dumps({"host": "gpu-node-7", "pid": 4242, "since": "2026-11-29 10:00:00",
                                 "token": "t", "heartbeat": time.time()}))
    with pytest.raises(UserError, match=r"host gpu-node-7, PID 4242, since 2026-11-29 10:00:00"):
        ExperimentLock(uri, settle_s=0.05).acquire()


# ------------------------------------------------------------------------------ interrupted searches


class _TuneResult:
    """The parts of a Ray Tune `Result` that results.build_tables reads, for a trial in `dir`."""

    def __init__(self, exp: Path, trial_id: str, steps: list[int], *, status: str = "running",
                 lr: float = 1e-3, values: list[float] | None = None):
        values = values or [0.1 + 0.1 * i for i in range(len(steps))]
        self.path = str(exp / f"simpo_trial_{trial_id}_1_x")
        self.error = None
        self.config = {"learning_rate": lr, "beta": 2.0, "gamma_beta_ratio": 0.5, "sft_weight": 0.5}
        self.metrics_dataframe = pd.DataFrame(
            [{"step": s, "eval/success_rate": v, "trial_id": trial_id} for s, v in zip(steps, values)]) \
            if steps else None
        self.metrics = ({"trial_id": trial_id, "step": steps[-1], "status": status, "total_steps": 40,
                         "eval/success_rate": values[len(steps) - 1]} if steps else {})


def _tune_state(exp: Path, statuses: dict[str, str]) -> None:
    """Tune's saved experiment state (what it writes one last time when SIGINT stops it)."""
    trial_data = [[json.dumps({"trial_id": t, "status": s, "relative_logdir": f"simpo_trial_{t}_1_x"}),
                   json.dumps({})] for t, s in statuses.items()]
    (exp / "experiment_state-2026-11-29_10-00-00.json").write_text(json.dumps({"trial_data": trial_data}))


def test_an_interrupted_search_labels_its_cut_trials_and_says_its_tables_are_partial(tmp_path, capsys):
    """Ctrl-C: Tune saved RUNNING/PENDING for the trials it then stopped (and marked TERMINATED in
    memory, like an ASHA stop). Those are `interrupted`, never ranked; the search is `interrupted`
    in search.json; no best_config.yaml; the summary gives the resume command."""
    import dataclasses

    from simpo_ray.search.records import SearchRecord
    from simpo_ray.search.results import finish
    from simpo_ray.search.plan import load

    space = load(TINY_SPACE)
    exp = tmp_path / "cut"
    exp.mkdir()
    record = SearchRecord.from_space(space, TINY_SPACE, "cut")
    results = [
        _TuneResult(exp, "aaaa0001", [0, 100, 200], status="completed", lr=1e-3),   # ended (ASHA stop)
        _TuneResult(exp, "aaaa0002", [0, 100], lr=2e-3, values=[0.1, 0.95]),         # cut at step 100
        _TuneResult(exp, "aaaa0003", [], lr=3e-3),                                    # never started
    ]
    results[0].metrics["status"] = "running"  # ASHA stopped it at step 200: stopped_early
    _tune_state(exp, {"aaaa0001": "TERMINATED", "aaaa0002": "RUNNING", "aaaa0003": "PENDING"})
    local = finish(results, space, str(exp), record, verbose=1,
                   resume_command="python -m simpo_ray.tune --space cpu-tiny.yaml --resume")
    out = capsys.readouterr().out
    trials = pd.read_csv(local / "trials.csv", dtype={"trial_id": str}).set_index("trial_id")
    assert trials["status"].to_dict() == {"aaaa0001": "stopped_early", "aaaa0002": "interrupted",
                                          "aaaa0003": "interrupted"}
    # The cut trial's 0.95 is higher than the stopped one's best, yet it is not ranked.
    assert trials.loc["aaaa0001", "rank"] == 1 and pd.isna(trials.loc["aaaa0002", "rank"])
    assert json.loads((local / "search.json").read_text())["state"] == "interrupted"
    assert not (local / "best_config.yaml").exists()
    assert "INTERRUPTED" in out and "finished" not in out.split("INTERRUPTED")[0]
    assert "1 stopped_early, 0 diverged, 0 errored, 2 interrupted; 9 not started" in out
    assert "The tables are partial" in out
    assert out.rstrip().endswith("resume it with: python -m simpo_ray.tune --space cpu-tiny.yaml --resume")

    # The same trials once the search ended: finished, best_config.yaml written.
    _tune_state(exp, {"aaaa0001": "TERMINATED", "aaaa0002": "TERMINATED", "aaaa0003": "ERROR"})
    finish(results, space, str(exp), dataclasses.replace(record, num_samples=3), verbose=0)
    assert json.loads((local / "search.json").read_text())["state"] == "finished"
    assert (local / "best_config.yaml").exists()


def test_a_trial_resumed_from_its_checkpoint_keeps_its_whole_learning_curve(tmp_path):
    """After --resume a trial continues from its Train checkpoint (step 400), and Tune starts its
    result file again: its reports begin at 500. The trial's Train history (every report of every
    attempt) gives back steps 0-400, each step once; a rerun from step 0 takes nothing from it."""
    from simpo_ray.search.results import TRIAL_HISTORY, build_tables

    exp = tmp_path / "exp"
    history = exp / TRIAL_HISTORY.format(trial_id="bbbb0001")
    history.parent.mkdir(parents=True)
    before = [{"step": s, "eval/success_rate": s / 1000, "checkpoint_path": f"/ckpt/{s}"} for s in range(0, 500, 100)]
    after = [{"step": s, "eval/success_rate": s / 1000} for s in (500, 600)]
    history.write_text("".join(json.dumps(r) + "\n" for r in before + after) + '{"step": 7')  # a cut last line
    resumed = _TuneResult(exp, "bbbb0001", [500, 600], status="completed", values=[0.5, 0.6])
    trials, curves = build_tables([resumed], objective="eval/success_rate", mode="max", default_point=None,
                                  info={}, exp_path=str(exp))
    assert curves["step"].tolist() == [0, 100, 200, 300, 400, 500, 600]
    assert curves["eval/success_rate"].tolist() == [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert trials.loc[0, "best_objective"] == 0.6 and trials.loc[0, "steps"] == 600

    # A trial rerun from step 0 (it had no checkpoint): Tune's reports cover it; the killed
    # attempt's higher value at step 100 must not come back.
    history2 = exp / TRIAL_HISTORY.format(trial_id="bbbb0002")
    history2.parent.mkdir(parents=True)
    history2.write_text(json.dumps({"step": 0, "eval/success_rate": 0.1}) + "\n"
                        + json.dumps({"step": 100, "eval/success_rate": 0.9}) + "\n")
    rerun = _TuneResult(exp, "bbbb0002", [0, 100, 200], status="completed", values=[0.1, 0.2, 0.3])
    trials, curves = build_tables([rerun], objective="eval/success_rate", mode="max", default_point=None,
                                  info={}, exp_path=str(exp))
    assert curves["eval/success_rate"].tolist() == [0.1, 0.2, 0.3]
    assert trials.loc[0, "best_objective"] == 0.3


def test_a_trial_whose_run_had_ended_when_resumed_is_completed_from_its_history(tmp_path):
    """Ctrl-C can land after a trial's run ended but before Tune saw it end: a --resume reruns
    it, its Train run has nothing left to do and reports nothing, and Tune's last result is the
    one before the end (step 30, still running). Its Train history holds the final report."""
    from simpo_ray.search.results import TRIAL_HISTORY, build_tables

    exp = tmp_path / "exp"
    history = exp / TRIAL_HISTORY.format(trial_id="cccc0001")
    history.parent.mkdir(parents=True)
    history.write_text("".join(json.dumps({"step": s, "status": "completed" if s == 40 else "running",
                                           "eval/success_rate": s / 100}) + "\n" for s in (0, 10, 20, 30, 40)))
    ended = _TuneResult(exp, "cccc0001", [], lr=1e-3)
    ended.metrics = {"trial_id": "cccc0001", "step": 30, "status": "running", "eval/success_rate": 0.3}
    trials, curves = build_tables([ended], objective="eval/success_rate", mode="max", default_point=None,
                                  info={}, exp_path=str(exp), tune_states={"cccc0001": {"status": "TERMINATED",
                                                                                        "dir": ""}})
    assert curves["step"].tolist() == [0, 10, 20, 30, 40]
    assert trials.loc[0, "status"] == "completed" and trials.loc[0, "steps"] == 40
    assert trials.loc[0, "objective_value"] == 0.4


def test_sigterm_ends_a_command_as_ctrl_c_does_with_status_143(capsys):
    """`run_command`: SIGTERM becomes what SIGINT does at that moment (here KeyboardInterrupt),
    one line and status 143; the previous SIGTERM handler is back afterwards."""
    from simpo_ray.cli import run_command

    before = signal.getsignal(signal.SIGTERM)

    def command():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # interrupted at once
        return 0

    t0 = time.monotonic()
    # What SIGINT does in a fresh process (an in-process Tune run earlier may have left its own).
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert run_command(command, debug=False) == 143
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert time.monotonic() - t0 < 5
    assert capsys.readouterr().err == "error: terminated (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is before
    assert run_command(lambda: 0, debug=False) == 0


@pytest.mark.slow
def test_sigterm_stops_a_training_run_in_seconds_without_rays_abort(tmp_path):
    """`python -m simpo_ray.train` with its own Ray, SIGTERMed mid-training: Ray's C++ handler
    (a stack dump, then abort) does not take over; the run stops as for Ctrl-C, exit 143, one
    error line, and the processes it started are gone soon after."""
    import subprocess
    import sys

    import psutil

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**BASE, "max_steps": 5000, "eval_steps": 10}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "simpo_ray.train", "--config", str(config),
                                 "--storage-path", str(tmp_path), "--name", "term"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not any(r["step"] >= 10 for r in _history(tmp_path / "term")):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "training did not start in time"
                time.sleep(0.2)
            ours = psutil.Process(proc.pid).children(recursive=True)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    out = log_path.read_text()
    print(f"SIGTERM to exit: {took:.1f} s")
    assert proc.returncode == 143, out[-3000:]
    assert took < 30
    assert "SIGTERM received" not in out and "Traceback" not in out, out[-3000:]
    assert [line for line in out.splitlines() if line.startswith("error:")] == ["error: terminated (SIGTERM)"]
    _, alive = psutil.wait_procs(ours, timeout=20)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.name() for p in alive]
