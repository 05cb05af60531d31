"""Disk space (`simpo_ray.search.disk`): the checkpoint size counted against a real checkpoint, the
check before a search and the watch during it on real small file systems (tmpfs mounts), and a
search whose disk fills half-way, then resumed (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from simpo_ray.errors import UserError
from simpo_ray.search import disk
from simpo_ray.search.searcher import DiskWatch
from simpo_ray.train import checkpoints, memory
from simpo_ray.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "search_spaces" / "cpu-tiny.yaml"
MB = 2**20


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size_mb) -> a fresh tmpfs of that size (the mount(2) call, no subprocess; unmounted
    after the test); skips where this process may not mount (not root, no CAP_SYS_ADMIN)."""
    libc, mounted = _libc(), []

    def mount(size_mb: int) -> Path:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        if libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", 0, f"size={size_mb}m".encode()) != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {os.strerror(ctypes_errno())}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        libc.umount2(str(path).encode(), 2)  # MNT_DETACH


def ctypes_errno() -> int:
    import ctypes

    return ctypes.get_errno()


def _fill(path: Path, leave: int) -> Path:
    """A file taking all of `path`'s free space but `leave` bytes."""
    filler = path / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, disk.free_bytes(str(path)) - leave)
    return filler


def test_a_checkpoint_takes_at_most_what_the_plan_counts(tmp_path):
    """A real checkpoint (DCP shards of the model and AdamW, RNG, state and config files) holds
    12 bytes a parameter and some files; `Need.checkpoint` counts at least all of it."""
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 4096, (1, 8))).logits.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    checkpoints.save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, {"step": 1},
                                TrainConfig(model_name_or_path="unused"), rank=0)
    written = sum(f.stat().st_size for f in (tmp_path / "ckpt").iterdir())
    params = memory.ModelShape.from_config(config, "test").total_params
    assert params == sum(p.numel() for p in model.parameters())
    need = disk.Need.of(params, trials=1, slots=1, keep=0)
    assert 12 * params <= written <= need.checkpoint, (written, 12 * params, need.checkpoint)


def test_the_check_before_a_search_refuses_warns_or_passes_by_free_space(tmpfs, tmp_path):
    """cpu-tiny (12 trials of bundled:tiny, ~2 MB a checkpoint): on 16 MB, not even one round of
    checkpoints and the records fit (refused, one line naming the path and what it needs); on
    48 MB one round does but the whole search may not (a warning); on 160 MB nothing is said."""
    from simpo_ray.search.plan import load

    space = load(TINY)
    small, middle, large = tmpfs(16), tmpfs(48), tmpfs(160)
    with pytest.raises(UserError) as refused:
        disk.check(space, str(small), slots=2)
    text = str(refused.value)
    assert "\n" not in text and str(small) in text and "free" in text and "--storage-path" in text
    warning = disk.check(space, str(middle), slots=2)
    assert warning and str(middle) in warning and "12 trials" in warning, warning
    assert disk.check(space, str(large), slots=2) is None


def test_the_watch_stops_the_search_like_ctrl_c_when_the_disk_fills(tmpfs):
    """`searcher.DiskWatch` sends its own process SIGUSR1 (which Tune handles as Ctrl-C) once, when the free
    space falls below its reserve, and says why; not before."""
    path = tmpfs(48)
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *a: got.append(a[0]))
    try:
        watch = DiskWatch(str(path), reserve=24 * MB, every_s=0)
        watch.on_step_begin(0, [])
        assert not got and disk.stopped(str(path)) is None
        _fill(path, leave=8 * MB)
        watch.on_step_begin(1, [])
        watch.on_step_begin(2, [])
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert got == [signal.SIGUSR1]
    reason = disk.stopped(str(path))
    assert reason and str(path) in reason and "MB free" in reason
    assert disk.stopped(str(path)) is None  # said once


def _tune_states(exp: Path) -> dict[str, str]:
    files = sorted(exp.glob("experiment_state-*.json"))
    try:
        data = json.loads(files[-1].read_text()) if files else {"trial_data": []}
    except (OSError, json.JSONDecodeError):  # replaced while we read it
        return {}
    out = {}
    for state, _ in data["trial_data"]:
        state = json.loads(state) if isinstance(state, str) else state
        out[state["trial_id"]] = state["status"]
    return out


@pytest.mark.slow
def test_a_disk_filled_mid_search_loses_no_finished_trial_and_resume_finishes_the_rest(tmpfs, tmp_path):
    """Storage on a 64 MB tmpfs; once two trials finished the disk is filled to 16 MB free (less
    than the next checkpoints and the records need): the search stops itself like Ctrl-C, exit
    1 with one line saying what to free and the resume command, the finished trials are in
    trials.csv, the cut ones `interrupted` with their parameters. After freeing the space,
    `--resume` finishes the rest and reruns nothing that had finished. A damaged Tune state is
    then refused in one line naming the file."""
    from simpo_ray.search.run import _check_resumable

    data = yaml.safe_load(TINY.read_text())
    # Long enough that the third trial is still training when the first two have ended (trials
    # reuse their process and start in well under a second).
    data["base"].update(max_steps=160, eval_steps=20, generation_eval_samples=16, max_eval_samples=64)
    data["search"].update(num_samples=3, max_concurrent=2, scheduler="fifo", points_to_evaluate="default_only")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    storage = tmpfs(64)
    exp = storage / "results" / "full"
    args = [sys.executable, "-m", "simpo_ray.tune", "--space", str(space), "--storage-path",
            str(storage / "results"), "--name", "full"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not the session's
    env.update(TUNE_GLOBAL_CHECKPOINT_S="1", PYTHONPATH=str(ROOT))
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while sum(s == "TERMINATED" for s in _tune_states(exp).values()) < 2:
                assert first.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "no two trials finished in time"
                time.sleep(0.25)
            finished = {t for t, s in _tune_states(exp).items() if s == "TERMINATED"}
            finished_results = {t: next(exp.glob(f"*_{t}_*")).joinpath("result.json").read_text() for t in finished}
            filler = _fill(storage, leave=16 * MB)
            first.wait(timeout=240)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
    out = log_path.read_text()
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert first.returncode == 1, out[-3000:]
    assert len(errors) == 1 and "stopped before the disk filled" in errors[0] and "--resume" in errors[0], errors
    assert "Traceback" not in out, out[-3000:]
    trials = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str}).set_index("trial_id")
    assert finished <= set(trials.index[trials["status"] == "completed"]), trials["status"]
    cut = trials[trials["status"] != "completed"]
    assert (cut["status"] == "interrupted").all() and cut[["learning_rate", "beta"]].notna().all().all()
    assert json.loads((exp / "search.json").read_text())["state"] == "interrupted"
    assert not (exp / "best_config.yaml").exists()

    filler.unlink()
    second = subprocess.run(args + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    trials = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str}).set_index("trial_id")
    assert len(trials) == 3 and (trials["status"] == "completed").all(), trials["status"]
    for t, text in finished_results.items():  # not run again
        assert next(exp.glob(f"*_{t}_*")).joinpath("result.json").read_text() == text

    # A state file cut short by a full disk: refused in one line naming it, before Ray starts.
    searcher = sorted(exp.glob("searcher-state-*.pkl"))[-1]  # one per session, named by its start
    searcher.write_bytes(searcher.read_bytes()[:100])
    with pytest.raises(UserError) as refused:
        _check_resumable(str(exp))
    assert str(searcher) in str(refused.value) and "\n" not in str(refused.value)
