"""A guard for a private Ray cluster: its leftover processes end within seconds of its driver.

A SIGKILLed driver takes its private cluster's raylet and GCS with it, but the cluster's
DashboardAgent and RuntimeEnvAgent then live about 60 s more: each sees its raylet die at once,
then tries to tell the (dead) GCS so, which Ray does with a fixed 60 s timeout
(`ray._private.utils.publish_error_to_driver`). The guard is a small process started with the
cluster (`start`), in its own session (a Ctrl-C or a kill of the driver's process group does not
reach it), reading a pipe from the driver. When the pipe closes, the driver is gone, however it
ended; the guard then ends the Ray processes of sessions under the clusters' directory whose
raylet and gcs_server are gone (`end_dead_session_processes`, which `cluster.init_ray` also runs
before a private cluster starts: a live session and a driver are never touched), until its own
session has none left or `GIVE_UP_S` passed.

REMOVE when Ray's agents exit without waiting on a dead GCS.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time

import psutil

from simpo_ray.errors import one_line

logger = logging.getLogger(__name__)
GIVE_UP_S = 20.0
_guards: list[subprocess.Popen] = []  # kept for the driver's life: their pipes close when it ends
_warned: set[str] = set()


# ---------------------------------------------------------------- leftovers of a killed driver
#
# After SIGKILL of a driver that started a private cluster, its gcs_server and raylet exit, but
# its DashboardAgent and RuntimeEnvAgent outlive it for a minute or more: they block for 60 s
# at a time publishing an error to the dead GCS, ignoring SIGTERM meanwhile. A search started
# next must not depend on (or share the machine with) them. Private clusters keep their
# sessions under their own root (`cluster.ray_temp_dir()`), so the processes of a session whose
# raylet and gcs_server are gone can be told apart from any live cluster's and SIGKILLed.
# REMOVE when Ray's agents exit by themselves once their raylet is gone (check: the test
# `test_agents_of_a_killed_driver_are_ended_when_the_next_cluster_starts` finds no agent alive
# right after the driver's SIGKILL).
_RAY_SCRIPTS = ("/ray/_private/workers/", "/ray/dashboard/", "/ray/_private/runtime_env/agent/",
                "/ray/autoscaler/_private/monitor.py", "/ray/_private/log_monitor.py")
_SESSION_OWNERS = ("raylet", "gcs_server")


def _ray_process_info(proc, root: str) -> tuple[str, str] | None:
    """(session dir under `root`, kind) of one of Ray's own processes of a session under
    `root`, or None. Kind: the process name (raylet, gcs_server) or its command."""
    try:
        cmdline = proc.cmdline()
        name = proc.name()
    except (psutil.Error, OSError) as e:  # gone, or not ours to read
        logger.debug("skipping pid %s: %s", proc.pid, one_line(e, with_type=True))
        return None
    text = " ".join(cmdline)
    if not (name in _SESSION_OWNERS or text.startswith("ray::") or any(s in text for s in _RAY_SCRIPTS)):
        return None
    pattern = re.compile(re.escape(root.rstrip("/")) + r"/(session_[^/\s]+)")
    found = pattern.search(text)
    if found is None:
        try:
            found = pattern.search(" ".join(f.path for f in proc.open_files()))
        except (psutil.Error, OSError) as e:
            logger.debug("skipping pid %s (open files): %s", proc.pid, one_line(e, with_type=True))
            return None
    if found is None:
        return None
    return found.group(1), (name if name in _SESSION_OWNERS else text[:60])


def end_dead_session_processes(root: str, *, wait_s: float = 5.0) -> list[str]:
    """SIGKILL this user's Ray processes of sessions under `root` whose raylet and gcs_server
    are both gone; returns what was ended ("<session> <kind> pid <n>"). A session with a live
    raylet or gcs_server (a running cluster, or one being started) is never touched, and only
    Ray's own processes are (raylet, gcs_server, `ray::` workers and agents, Ray's scripts):
    never a driver."""
    if not os.path.isdir(root):
        return []
    me = os.getpid()
    uid = os.getuid()
    sessions: dict[str, list] = {}
    live: set[str] = set()
    for proc in psutil.process_iter():
        try:
            if proc.pid == me or proc.uids().real != uid:
                continue
        except (psutil.Error, OSError) as e:
            logger.debug("skipping pid %s (owner): %s", proc.pid, one_line(e, with_type=True))
            continue
        info = _ray_process_info(proc, root)
        if info is None:
            continue
        session, kind = info
        sessions.setdefault(session, []).append((proc, kind))
        if kind in _SESSION_OWNERS:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    live.add(session)
            except (psutil.Error, OSError) as e:  # ended meanwhile: not live
                logger.debug("pid %s ended while checked: %s", proc.pid, one_line(e, with_type=True))
    ended, victims = [], []
    for session, procs in sessions.items():
        if session in live:
            continue
        for proc, kind in procs:
            try:
                proc.kill()
                victims.append(proc)
                ended.append(f"{session} {kind} pid {proc.pid}")
            except psutil.NoSuchProcess:
                continue
            except Exception as e:  # noqa: BLE001
                if "end-dead-session" not in _warned:
                    _warned.add("end-dead-session")
                    logger.warning("could not end a leftover Ray process (pid %s): %s", proc.pid,
                                   one_line(e, with_type=True))
    if victims:
        psutil.wait_procs(victims, timeout=wait_s)
        logger.info("ended %d process(es) left by dead Ray sessions under %s", len(victims), root)
    return ended



def start(root: str, session: str) -> None:
    """Start a guard for the private cluster of `session` (a `session_...` directory name) under `root`."""
    _guards.append(subprocess.Popen(
        [sys.executable, "-m", "simpo_ray.infra.guard", root, session], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True))


def _session_alive(root: str, session: str) -> bool:
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
    deadline = time.monotonic() + GIVE_UP_S
    while time.monotonic() < deadline and _session_alive(root, session):
        end_dead_session_processes(root, wait_s=2.0)
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    os.nice(5)
    sys.exit(main(sys.argv[1], sys.argv[2]))
