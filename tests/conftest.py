"""Shared test fixtures. Tests never reach the Hugging Face Hub: offline mode is set before any
test module imports `datasets` or `transformers` (they read it at import time)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    """Matplotlib builds its font cache on first use by running `fc-list`: build it here, before the
    fast tier's guard (below) refuses subprocesses, so a fresh machine's first plot is not refused."""
    import matplotlib.font_manager  # noqa: F401


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory):
    """The bundled character-level fast tokenizer (chat template writes BOS; `<s>` `</s>` `<pad>`)."""
    from simpo_ray.bundled.tokenizer import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("chat_tokenizer"))


# One model/data cache for the whole session, so the bundled SFT models are built once (set
# before Ray starts: Ray's worker processes inherit the environment of the driver).
if "SIMPO_RAY_CACHE" not in os.environ:
    import tempfile

    os.environ["SIMPO_RAY_CACHE"] = tempfile.mkdtemp(prefix="simpo-ray-test-cache-")


def _start_ray():
    from simpo_ray.infra.cluster import init_ray, ray_env_defaults

    ray_env_defaults()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    return init_ray(num_cpus=2, log_to_driver=False, configure_logging=False)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local 2-CPU Ray cluster shared by the tests that need one (started on first use)."""
    import ray

    from simpo_ray.infra.cluster import shutdown_ray

    if ray.is_initialized():
        shutdown_ray()  # e.g. the cluster a search run in this process started (its reaper too)
    yield _start_ray()
    shutdown_ray()


@pytest.fixture(autouse=True)
def _ray_leak_check(request):
    """After each test on the shared cluster: a test that left CPUs or placement groups held
    errors, naming them, and the cluster is restarted, instead of the next test waiting for
    resources that never come back (a search would wait forever)."""
    yield
    if "ray_cluster" not in request.fixturenames:
        return
    import ray

    if not ray.is_initialized():
        return
    from ray_helpers import leftovers

    left = leftovers(timeout_s=60)
    if left:
        from simpo_ray.infra.cluster import shutdown_ray

        shutdown_ray()
        _start_ray()
        pytest.fail(f"{request.node.nodeid} left the shared Ray cluster holding: {'; '.join(left)} "
                    "(the cluster was restarted)")


# The fast tier (`pytest -m "not slow"`) must not start Ray, a subprocess or a process group:
# a test that does is refused here, naming the mark it needs, so the tier stays fast by
# construction rather than by convention.
class _SlowOnly(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _fast_tier_guard(request, monkeypatch):
    if request.node.get_closest_marker("slow") or request.node.get_closest_marker("stress"):
        yield
        return
    import subprocess

    if "ray_cluster" in request.fixturenames:
        pytest.fail(f"{request.node.nodeid} uses the ray_cluster fixture: mark it @pytest.mark.slow")

    def refuse(what):
        def _refused(*args, **kwargs):
            raise _SlowOnly(f"{request.node.nodeid} {what}: mark it @pytest.mark.slow")
        return _refused

    popen_init = subprocess.Popen.__init__

    def popen(self, args, *rest, **kwargs):  # a `python -c` snippet is quick; a CLI or search is not
        if not (isinstance(args, (list, tuple)) and "-c" in args[1:2]):
            refuse(f"starts a subprocess ({args!r:.80})")()
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    import ray

    monkeypatch.setattr(ray, "init", refuse("starts Ray"))
    import torch.multiprocessing

    monkeypatch.setattr(torch.multiprocessing, "start_processes", refuse("starts a process group"))
    yield
