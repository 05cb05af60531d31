"""`infra.local_run.LocalRun`: a single-worker run in the trial's own process keeps what a Ray
Train run keeps, where Train keeps it (the search path end to end: test_reliability.py's
killed in-process trial, and every search test, which runs its trials this way)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from simpo_ray.infra.history import read_history
from simpo_ray.infra.local_run import LocalRun
from simpo_ray.train.checkpoints import CONFIG_FILE, STATE_FILE


def _checkpoint(tmp: Path, step: int) -> Path:
    """A directory that passes `is_checkpoint` (its config and DCP's metadata) and names its step."""
    d = tmp / f"src-{step}"
    d.mkdir()
    (d / CONFIG_FILE).write_text("{}")
    (d / ".metadata").write_text("")
    (d / STATE_FILE).write_text(json.dumps({"counters": {"step": step}}))
    (d / "step").write_text(str(step))
    return d


def _kept_steps(run: LocalRun) -> list[int]:
    return [int((p / "step").read_text()) for p in run.checkpoints()]


def _play(tmp_path, scores, **kw) -> LocalRun:
    run = LocalRun(tmp_path / "run", **kw)
    for step, value in enumerate(scores, start=1):
        run.report({"step": step, "acc": value}, _checkpoint(tmp_path, step))
    return run


@pytest.mark.parametrize("keep, order, expected", [
    # scores by step: 1: 0.5, 2: 0.9, 3: 0.7, 4: 0.6 (the latest)
    (1, "max", [2, 4]),      # the best and the latest
    (2, "max", [2, 3, 4]),   # the two best and the latest
    (1, "min", [1, 4]),      # the lowest and the latest
    (4, "max", [1, 2, 3, 4]),
])
def test_retention_keeps_the_best_by_score_and_the_latest(tmp_path, keep, order, expected):
    run = _play(tmp_path, [0.5, 0.9, 0.7, 0.6], keep=keep, score="acc", order=order)
    assert _kept_steps(run) == expected
    assert run.latest_checkpoint() == str(run.checkpoints()[-1])


def test_retention_without_a_score_keeps_the_most_recent(tmp_path):
    run = _play(tmp_path, [0.5, 0.9, 0.7, 0.6], keep=2)
    assert _kept_steps(run) == [3, 4]


def test_a_non_finite_or_missing_score_ranks_last_and_ties_keep_the_newer(tmp_path):
    run = _play(tmp_path, [0.8, math.nan, 0.8, 0.1], keep=1, score="acc", order="max")
    assert _kept_steps(run) == [3, 4]  # 0.8 twice: the newer; nan never beats a number


def test_each_report_is_in_the_history_and_forwarded_after_its_checkpoint_is_whole(tmp_path):
    seen = []

    def forward(row):  # what Tune gets: the checkpoint is already in place
        path = row.get("checkpoint_path")
        seen.append((row["step"], path, path is not None and (Path(path) / "step").is_file()))

    run = LocalRun(tmp_path / "run", keep=1, score="acc", forward=forward)
    run.report({"step": 0, "acc": 0.1})
    run.report({"step": 1, "acc": 0.2}, _checkpoint(tmp_path, 1))
    assert [(s, p is not None, whole) for s, p, whole in seen] == [(0, False, False), (1, True, True)]
    rows = read_history(tmp_path / "run" / "history.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[1]["checkpoint_path"] == seen[1][1]
    assert Path(rows[1]["checkpoint_path"]).name.startswith("checkpoint_")
    assert json.loads((tmp_path / "run" / "history.jsonl").read_text().splitlines()[0])["acc"] == 0.1


def test_a_copy_cut_short_by_a_crash_is_dropped_and_never_resumed_from(tmp_path):
    run = _play(tmp_path, [0.5], keep=2, score="acc")
    partial = run.dir / ".partial-checkpoint_2099-01-01_00-00-00.000000"
    partial.mkdir()
    (partial / CONFIG_FILE).write_text("{}")
    half = run.dir / "checkpoint_2099-01-01_00-00-00.000000"  # renamed but without DCP's metadata
    half.mkdir()
    (half / CONFIG_FILE).write_text("{}")
    again = LocalRun(run.dir, keep=2, score="acc")  # the restarted trial
    assert not partial.exists()
    assert again.latest_checkpoint() == str(run.checkpoints()[0])
    assert _kept_steps(again) == [1]


def test_the_loop_reports_through_the_sink_and_resumes_as_a_restart(tmp_path):
    """The real loop in this process (`launch.run_in_process`): every report reaches the run's
    history with its checkpoint; a second call (a restarted trial) resumes from the latest and
    counts one restart, reporting no step twice."""
    from simpo_ray.config import Resources, TrainConfig
    from simpo_ray.infra.launch import check_inputs, run_in_process

    cfg = TrainConfig(model_name_or_path="bundled:tiny", dataset_mixer={"bundled:sort": 1.0}, max_length=64,
                      max_prompt_length=32, max_steps=4, eval_steps=2, logging_steps=2, max_eval_samples=16,
                      generation_eval_samples=0, per_device_train_batch_size=4, save_total_limit=1)
    prepared = check_inputs(cfg)
    data = {"train": prepared.train_path, "eval": prepared.eval_path}  # paths: no object store, no Ray
    run = LocalRun(tmp_path / "run", keep=1, score="eval/preference_accuracy")
    calls = []

    def stop_after_step_2(config):  # the first attempt dies after its step-2 checkpoint
        from simpo_ray.train.loop import train_loop_per_worker

        sink = config["report"]

        def report(metrics, checkpoint_dir=None):
            sink(metrics, checkpoint_dir)
            if metrics["step"] == 2 and not calls:
                calls.append("died")
                raise RuntimeError("killed")
        train_loop_per_worker({**config, "report": report})

    with pytest.raises(RuntimeError, match="killed"):
        run_in_process(cfg, data, Resources(1, 1.0), run, train_loop=stop_after_step_2)
    run_in_process(cfg, data, Resources(1, 1.0), LocalRun(tmp_path / "run", keep=1,
                                                                   score="eval/preference_accuracy"))
    rows = read_history(tmp_path / "run" / "history.jsonl")
    assert [(r["step"], r.get("restarts", 0)) for r in rows] == [(0, 0), (2, 0), (4, 1)]
    assert rows[-1]["status"] == "completed"
    assert all("checkpoint_path" in r for r in rows[1:])
    assert len(run.checkpoints()) <= 2


@pytest.mark.parametrize("overrides, uri, expected", [
    ({}, False, True),                                   # the bundled space: one CPU worker, DDP
    ({"search.local_mode": False}, False, False),        # asked for Train's workers
    ({"resources.num_workers": 2}, False, False),        # several workers: TorchTrainer, DDP
    ({"base.parallel": "fsdp"}, False, False),           # FSDP needs Train's process group, even at 1
    ({}, True, False),                                   # a URI storage path: Train persists it
])
def test_which_trials_train_in_their_own_process(overrides, uri, expected):
    from simpo_ray.search.plan import load
    from simpo_ray.search.run import in_process_trials

    space = load(Path(__file__).resolve().parents[1] / "search_spaces" / "cpu-tiny.yaml", overrides=overrides)
    assert in_process_trials(space, "s3://bucket/exp" if uri else "/tmp/exp") is expected


def test_a_staged_checkpoint_is_renamed_into_place_and_the_latest_is_by_step(tmp_path):
    """The loop writes into `staging()`; the report takes that directory over (no copy), and a
    staging directory never reported is removed. The latest checkpoint is the highest step, whatever
    the names say (a clock set back gives a later step an earlier name)."""
    run = LocalRun(tmp_path / "run", keep=3, score="acc")
    with run.staging() as staged:
        for name in (CONFIG_FILE, ".metadata"):
            (Path(staged) / name).write_text("{}" if name == CONFIG_FILE else "")
        (Path(staged) / STATE_FILE).write_text(json.dumps({"counters": {"step": 7}}))
        inode = Path(staged).stat().st_ino
        run.report({"step": 7, "acc": 0.5}, staged)
        assert not Path(staged).exists()
    kept = run.checkpoints()
    assert len(kept) == 1 and kept[0].stat().st_ino == inode  # the same directory, renamed
    early_name = run.dir / "checkpoint_2000-01-01_00-00-00.000000"  # step 9 under an older name
    early_name.mkdir()
    for name, text in ((CONFIG_FILE, "{}"), (".metadata", ""), (STATE_FILE, json.dumps({"counters": {"step": 9}}))):
        (early_name / name).write_text(text)
    assert run.latest_checkpoint() == str(early_name)
    with pytest.raises(RuntimeError):
        with run.staging() as staged:
            raise RuntimeError("the loop failed before reporting")
    assert not Path(staged).exists() and not list(run.dir.glob(".partial-*"))


@pytest.mark.parametrize("granted, expected", [
    ({"CPU": 1.0, "memory": 6.7e7}, True),
    ({"CPU": 0.0, "memory": 6.7e7}, False),  # a trial Tune restored from before in-process trials
    ({"CPU": 1.0}, True),
])
def test_a_trial_trains_in_process_only_when_it_holds_a_workers_resources(granted, expected):
    from simpo_ray.search.run import _holds

    assert _holds(granted, {"CPU": 1.0}) is expected
    assert _holds({**granted, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}) is expected
    assert _holds(granted, {"CPU": 1.0, "GPU": 1.0}) is False
