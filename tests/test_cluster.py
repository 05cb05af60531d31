"""simpo_ray.infra.cluster: concurrency planning (by hand), and a real search's trials (the production
trainable, `tune.trial_trainable`, with a stub worker loop) running two at a time on 2 CPUs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from simpo_ray.infra.cluster import ClusterInfo, plan_concurrency
from simpo_ray.errors import UserError
from simpo_ray.config import Resources

TINY_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "cpu-tiny.yaml"


def cluster(*nodes: dict[str, float]) -> ClusterInfo:
    total: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            total[k] = total.get(k, 0.0) + v
    return ClusterInfo(total=total, nodes=tuple(nodes))


# ---------------------------------------------------------------- plan_concurrency, by hand


def test_two_cpus_one_cpu_trials_run_two_at_once():
    # driver and controller take 0 CPU, so 2 CPUs hold two 1x1-CPU worker groups
    assert plan_concurrency(cluster({"CPU": 2}), Resources(1, 1.0)) == 2


def test_requested_max_caps_but_never_raises_capacity():
    c = cluster({"CPU": 8})
    assert plan_concurrency(c, Resources(2, 1.0), requested_max=3) == 3
    assert plan_concurrency(c, Resources(2, 1.0), requested_max=10) == 4  # 8 // (2*1)


def test_fractional_and_per_node_packing():
    # 3 nodes of 3 CPU, bundles of 2 CPU: 1 per node (not 9 // 2 = 4) -> 3 slots -> 1 trial of 2
    c = cluster({"CPU": 3}, {"CPU": 3}, {"CPU": 3})
    assert plan_concurrency(c, Resources(2, 2.0)) == 1
    # 0.5 CPU workers: 2 CPUs -> 4 slots -> 2 trials of 2 workers
    assert plan_concurrency(cluster({"CPU": 2}), Resources(2, 0.5)) == 2


def test_gpus_bound_concurrency():
    c = cluster({"CPU": 16, "GPU": 4}, {"CPU": 16, "GPU": 4})
    assert plan_concurrency(c, Resources(2, 4.0, 1.0)) == 4  # 8 GPUs / 2 per trial
    assert plan_concurrency(c, Resources(1, 4.0, 1.0)) == 8
    assert plan_concurrency(c, Resources(1, 10.0, 1.0)) == 2  # CPU-bound: 1 per node


def test_more_gpus_per_worker_than_any_node_is_refused():
    c = cluster({"CPU": 16, "GPU": 2}, {"CPU": 16, "GPU": 2})
    with pytest.raises(UserError, match="no node has that many"):
        plan_concurrency(c, Resources(1, 1.0, 4.0))


def test_gpu_trial_on_cpu_cluster_is_refused():
    with pytest.raises(UserError, match=r"needs 1 GPU.*largest node: 0 GPU"):
        plan_concurrency(cluster({"CPU": 2}), Resources(1, 1.0, 1.0))


def test_more_workers_than_cluster_is_refused():
    with pytest.raises(UserError, match=r"room for only 2 such worker"):
        plan_concurrency(cluster({"CPU": 2}), Resources(3, 1.0))
    with pytest.raises(UserError, match=r"room for only 4 such worker"):
        plan_concurrency(cluster({"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}),
                         Resources(5, 1.0, 1.0))


def test_bad_resources_and_bad_max():
    with pytest.raises(UserError):
        Resources(0, 1.0)
    with pytest.raises(UserError):
        Resources(1, 0.0, 0.0)
    with pytest.raises(UserError):
        Resources(1, 1.0, 1.5)
    with pytest.raises(UserError):
        plan_concurrency(cluster({"CPU": 2}), Resources(1, 1.0), requested_max=0)


# ---------------------------------------------------------------- real Ray


def _stub_loop(config):
    """Stands in for `train.train_loop_per_worker`: gets the same worker config, reports 3 steps."""
    import time as _time

    import torch  # noqa: F401  (a real worker imports torch)

    import ray.train

    x = config["train"]["learning_rate"] * 1000
    for step in range(1, 4):
        _time.sleep(0.2)
        ray.train.report({"step": step, "loss": x / step})


class _SlowDriver:
    """A Tune callback that takes 1 s per result in the driver, as logger callbacks writing to a
    database can: the Train run's last report then reaches the trial's queue after its `fit()`
    returned, where Ray 2.60 deadlocked the trial (ray_workarounds.wait_for_tune_to_take_reports)."""

    def __new__(cls):
        from ray.tune import Callback

        class SlowDriver(Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                time.sleep(1.0)

        return SlowDriver()


@pytest.fixture(scope="module")
def ray_two_cpus(ray_cluster, tmp_path_factory):
    """The session's 2-CPU cluster (tests/conftest.py, started by ``init_ray(num_cpus=2)``)."""
    import sys

    from ray import cloudpickle

    # Ray workers cannot import this test module: ship its functions by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray_cluster, tmp_path_factory.mktemp("ray_storage")


@pytest.mark.slow
def test_init_ray_reports_cluster(ray_two_cpus):
    info, _ = ray_two_cpus
    assert info.cpus == 2 and info.gpus == 0 and len(info.nodes) == 1
    assert plan_concurrency(info, Resources(1, 1.0)) == 2
    with pytest.raises(UserError):
        plan_concurrency(info, Resources(1, 1.0, 1.0))


@pytest.mark.slow
def test_four_trials_two_slots_no_deadlock_and_resources_returned(ray_two_cpus):
    import ray
    from ray import tune

    from ray_helpers import resources_settled
    from simpo_ray.search.plan import load
    from simpo_ray.search.run import trial_trainable

    info, storage = ray_two_cpus
    # 1 worker x 1 CPU per trial, trained by Train's workers (search.local_mode: false, as every
    # multi-worker trial is): the Train-to-Tune relay where the deadlocks were.
    space = load(TINY_SPACE, overrides={"search.local_mode": False})
    res = space.resources
    assert res == Resources(num_workers=1, cpus_per_worker=1.0)
    # What such a search trial runs (0-CPU trial driver, launch.make_trainer), with a stub loop.
    trainable = trial_trainable(space, {}, str(storage / "four"), train_loop=_stub_loop)
    lrs = [1e-4, 2e-4, 3e-4, 4e-4]  # two rounds of two slots: where the old deadlock struck
    tuner = tune.Tuner(
        trainable,
        param_space={"learning_rate": tune.grid_search(lrs)},
        tune_config=tune.TuneConfig(metric="loss", mode="min", reuse_actors=True,
                                    max_concurrent_trials=plan_concurrency(info, res)),
        run_config=tune.RunConfig(name="four", storage_path=str(storage), verbose=0, callbacks=[_SlowDriver()]),
    )
    t0 = time.monotonic()
    results = tuner.fit()
    wall = time.monotonic() - t0
    assert len(results) == len(lrs)
    assert not results.errors
    for r in results:
        assert r.metrics["step"] == 3
        assert r.metrics["loss"] == pytest.approx(r.config["learning_rate"] * 1000 / 3)
    assert results.get_best_result().config["learning_rate"] == 1e-4
    # The old deadlock never finishes (each stuck trial re-times-out every 60 s); a healthy run is
    # ~2 rounds of ~10-20 s trials. Generous bound: the machine is shared and only has 2 cores.
    assert wall < 180, f"{len(lrs)} tiny trials took {wall:.0f}s"
    assert resources_settled(timeout_s=30), (ray.available_resources(), ray.cluster_resources())
    assert ray.available_resources()["CPU"] == ray.cluster_resources()["CPU"] == 2

    # No leftover Train placement groups or per-run helper actors (the reaper thread that
    # init_ray started removes what Train V2 cannot clean up without the State API).
    from ray._private.state import actors

    leftovers = ["?"]
    deadline = time.monotonic() + 20
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.5)
        leftovers = sorted(
            a["ActorClassName"] for a in actors().values()
            if a["State"] == "ALIVE" and a["ActorClassName"] in (
                "TrainController", "RayTrainWorker", "PlacementGroupCleaner",
                "SynchronizationActor", "PreemptionWatcher"))
    assert leftovers == []
    live_pgs = [p for p in ray.util.placement_group_table().values() if p["state"] != "REMOVED"]
    assert live_pgs == []


# ---------------------------------------------------------------- failing to start Ray (issue 12, item 14)


@pytest.fixture
def fake_ray_start(monkeypatch):
    """`ray.init` replaced by `fails` (a list of exceptions raised by successive calls, then
    success); nothing else of Ray runs. Returns the list of calls' kwargs."""
    import ray

    import simpo_ray.infra.cluster as cluster_mod
    from simpo_ray.infra import ray_workarounds

    calls: list[dict] = []
    plan: list[BaseException] = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        if plan:
            raise plan.pop(0)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(cluster_mod.time, "sleep", lambda s: None)
    monkeypatch.setattr(ray_workarounds, "start_orphan_reaper", lambda: None)
    monkeypatch.setattr(cluster_mod.guard, "end_dead_session_processes", lambda root: [])
    monkeypatch.setattr(cluster_mod.guard, "start", lambda root, session: None)  # no cluster to guard
    monkeypatch.setattr(ClusterInfo, "from_ray", classmethod(lambda cls: cluster({"CPU": 2})))
    return calls, plan


def test_a_timeout_starting_the_local_cluster_is_retried(fake_ray_start, capsys):
    import tempfile

    import ray

    from simpo_ray.infra.cluster import init_ray

    calls, plan = fake_ray_start
    plan += [ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready."),
             TimeoutError("Timed out while waiting for node to startup.")]
    assert init_ray(num_cpus=2).cpus == 2
    assert len(calls) == 3
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("retrying in" in line for line in err), err
    # The private cluster: loopback only, in simpo-ray's own temp dir.
    assert calls[0]["_node_ip_address"] == "127.0.0.1"
    assert calls[0]["_temp_dir"].startswith(tempfile.gettempdir())


def test_every_failure_to_start_the_local_cluster_is_one_error_line(fake_ray_start, tmp_path, capsys, monkeypatch):
    """Through the CLI: a timeout that persists (3 attempts) and a non-transient failure (1
    attempt) are each one `error:` line, exit 2, no traceback."""
    import ray

    from simpo_ray.cli import tune_main

    calls, plan = fake_ray_start
    for failure, attempts, needle in [
            (ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready."), 3, "after 3 attempts"),
            (RuntimeError("Ray traceback ...\nFailed to start the raylet: address in use"), 1, "raylet: address in use")]:
        calls.clear()
        plan[:] = [failure] * attempts
        rc = tune_main(["--space", str(TINY_SPACE), "--storage-path", str(tmp_path / f"r{attempts}")])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(calls) == attempts
        assert len(err) == 1 and "cannot start the local Ray cluster" in err[0] and needle in err[0], err


def test_failing_to_join_a_cluster_is_one_error_line(fake_ray_start):
    from simpo_ray.infra.cluster import init_ray

    calls, plan = fake_ray_start
    plan.append(ConnectionError("Could not find any running Ray instance."))
    with pytest.raises(UserError) as info:
        init_ray("10.0.0.1:6379")
    message = str(info.value)
    assert len(calls) == 1 and "\n" not in message
    assert message.startswith("cannot connect to the Ray cluster at '10.0.0.1:6379': ConnectionError: Could not "
                              "find any running Ray instance.; check the address")


@pytest.mark.parametrize("cli", ["tune", "train"])
def test_an_address_where_nothing_answers_is_one_line_in_seconds(cli, tmp_path, capsys):
    """`--address 127.0.0.1:1` used to hang for minutes inside `ray.init` (Ray rewrites the
    address and retries, printing its C++ client's warnings); now a TCP probe refuses it first,
    before the data is prepared and before any Ray process starts."""
    import time

    from simpo_ray.cli import train_main, tune_main

    if cli == "tune":
        argv = ["--space", str(Path(__file__).resolve().parent.parent / "search_spaces" / "cpu-tiny.yaml"), "--storage-path", str(tmp_path / "r")]
        main = tune_main
    else:
        config = tmp_path / "c.yaml"
        config.write_text("model_name_or_path: bundled:tiny\nmax_length: 64\nmax_prompt_length: 32\n")
        argv, main = ["--config", str(config), "--storage-path", str(tmp_path / "r")], train_main
    t0 = time.monotonic()
    rc = main([*argv, "--address", "127.0.0.1:1"])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 2 and elapsed < 10, (rc, elapsed)
    assert err.startswith("error: cannot connect to the Ray cluster at '127.0.0.1:1': nothing answers on 127.0.0.1:1")
    assert err.count("\n") == 1


def test_a_malformed_address_is_refused():
    from simpo_ray.errors import UserError
    from simpo_ray.infra.cluster import check_address

    with pytest.raises(UserError, match="use 'auto' or host:port"):
        check_address("no-port-here")
