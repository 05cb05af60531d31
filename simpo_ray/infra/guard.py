"""A guard for a private Ray cluster: its leftover processes end within seconds of its driver.

A SIGKILLed driver takes its private cluster's raylet and GCS with it, but the cluster's
DashboardAgent and RuntimeEnvAgent then live about 60 s more: each sees its raylet die at once,
then tries to tell the (dead) GCS so, which Ray does with a fixed 60 s timeout
(`ray._private.utils.publish_error_to_driver`). The guard is a small process started with the
cluster (`start`), in its own session (a Ctrl-C or a kill of the driver's process group does not
reach it), reading a pipe from the driver. When the pipe closes, the driver is gone, however it
ended; the guard then ends the Ray processes of sessions under the clusters' directory whose
raylet and gcs_server are gone (`ray_workarounds.end_dead_session_processes`: a live session
and a driver are never touched), until its own session has none left or `GIVE_UP_S` passed.

REMOVE when Ray's agents exit without waiting on a dead GCS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GIVE_UP_S = 20.0
_guards: list[subprocess.Popen] = []  # kept for the driver's life: their pipes close when it ends


def start(root: str, session: str) -> None:
    """Start a guard for the private cluster of `session` (a `session_...` directory name) under `root`."""
    _guards.append(subprocess.Popen(
        [sys.executable, "-m", "simpo_ray.infra.guard", root, session], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True))


def _session_alive(root: str, session: str) -> bool:
    import psutil

    from simpo_ray.infra.ray_workarounds import _ray_process_info

    for proc in psutil.process_iter():
        info = _ray_process_info(proc, root)
        if info is not None and info[0] == session:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    return True
            except psutil.Error:
                continue
    return False


def main(root: str, session: str) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdin.buffer.read()  # returns when the driver's end of the pipe closes
    from simpo_ray.infra.ray_workarounds import end_dead_session_processes

    deadline = time.monotonic() + GIVE_UP_S
    while time.monotonic() < deadline and _session_alive(root, session):
        end_dead_session_processes(root, wait_s=2.0)
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    os.nice(5)
    sys.exit(main(sys.argv[1], sys.argv[2]))
