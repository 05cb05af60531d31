"""One search per experiment: an exclusive lock on `<storage>/<name>`, held for the search's life.

Two searches started on the same storage path and name would both pass the "already exists"
check, share one experiment directory and overwrite each other's tables. `ExperimentLock` makes
the second one fail at once with one line naming the holder (host, PID, since when).

* Local disks and NFS: `fcntl.flock` on `<experiment>/.simpo-ray.lock`, kept open for the
  search's life. The kernel drops the lock when the holder exits in any way (SIGKILL, a crash),
  so a dead search never leaves a stale lock and nothing depends on clocks. On Linux NFS
  clients `flock` is a whole-file POSIX lock held by the server (NFSv4, or NLM on NFSv3), so it
  also excludes a search on another machine; a server releases a crashed client's lock when its
  lease ends (NFSv4: ~90 s). Caveat: mounts with `nolock` or `local_lock=flock|all` lock only
  per client. The file also holds the holder's host, PID and start time, for the message. It is
  never deleted (deleting a flock file lets a waiter and a newcomer lock two different inodes).
* Object-store URIs (`s3://`, `gs://`, any other `://` pyarrow opens): no locks there, so a
  lease object `<experiment>/.simpo-ray.lease.json` with owner token, host, PID, start time and
  a heartbeat rewritten every `HEARTBEAT_S`. A live lease (heartbeat younger than `STALE_S`, or
  a holder on this host whose PID is alive) refuses; a stale one (or one whose holder on this
  host is gone) is taken over. Taking it is write-then-read-back after `SETTLE_S`: of two
  searches that write at once, the one whose token is not read back gives up. Heartbeats
  compare clocks of different machines: `STALE_S` is generous for that.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from simpo_ray.errors import UserError
from simpo_ray.io import is_uri

logger = logging.getLogger(__name__)

LOCK_FILE = ".simpo-ray.lock"
LEASE_FILE = ".simpo-ray.lease.json"
HEARTBEAT_S = 30.0
STALE_S = 180.0
SETTLE_S = 2.0


@dataclass
class Holder:
    """Who holds an experiment: written into the lock file or the lease object."""

    host: str
    pid: int
    since: str  # local time the search took the lock, ISO format
    token: str = ""
    heartbeat: float = 0.0  # time.time() of the latest heartbeat (leases only)

    @classmethod
    def me(cls) -> Holder:
        return cls(host=socket.gethostname(), pid=os.getpid(), since=time.strftime("%Y-%m-%d %H:%M:%S"),
                   token=uuid.uuid4().hex, heartbeat=time.time())

    @classmethod
    def parse(cls, text: str | None) -> Holder | None:
        try:
            data = json.loads(text or "")
            return cls(host=str(data["host"]), pid=int(data["pid"]), since=str(data["since"]),
                       token=str(data.get("token", "")), heartbeat=float(data.get("heartbeat", 0.0)))
        except (ValueError, TypeError, KeyError):
            return None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        return f"host {self.host}, PID {self.pid}, since {self.since}"

    def on_this_host_and_gone(self) -> bool:
        """Whether the holder ran on this machine and its process no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


def _in_use(exp_path: str, holder: Holder | None, extra: str = "") -> UserError:
    who = holder.describe() if holder else "its owner has not recorded itself yet"
    return UserError(f"{exp_path} is in use by another search ({who}){extra}; wait for it to end, "
                     "or pass --name to start a search of another name")


class ExperimentLock:
    """`with ExperimentLock(exp_path):` holds the experiment for the block; see the module doc."""

    def __init__(self, exp_path: str, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 settle_s: float = SETTLE_S) -> None:
        self.exp_path = str(exp_path)
        self.heartbeat_s, self.stale_s, self.settle_s = heartbeat_s, stale_s, settle_s
        self.holder = Holder.me()
        self._fd: int | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def is_remote(self) -> bool:
        return is_uri(self.exp_path)

    def __enter__(self) -> ExperimentLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if self.is_remote:
            self._acquire_lease()
        else:
            self._acquire_flock()

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                os.ftruncate(self._fd, 0)  # no stale holder text for the next reader
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._stop is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._stop = self._thread = None
            try:
                current = Holder.parse(self._read_lease())
                if current is not None and current.token == self.holder.token:
                    fs, path = self._lease_fs()
                    fs.delete_file(path)
            except Exception as e:  # noqa: BLE001 - a leftover lease goes stale; say why it stayed
                logger.warning("could not remove the lease %s/%s: %s", self.exp_path, LEASE_FILE, e)

    # ------------------------------------------------------------ local disks and NFS

    def _acquire_flock(self) -> None:
        import fcntl

        path = Path(self.exp_path) / LOCK_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{path}: cannot create the experiment's lock file ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = None
            for _ in range(10):  # the holder writes itself in right after it locks
                holder = Holder.parse(os.pread(fd, 4096, 0).decode(errors="replace"))
                if holder is not None:
                    break
                time.sleep(0.05)
            os.close(fd)
            raise _in_use(self.exp_path, holder) from None
        except OSError as e:
            os.close(fd)
            raise UserError(f"{path}: cannot lock ({e.strerror or e}); is the file system mounted "
                            "with locking?") from None
        text = self.holder.to_json().encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        os.fsync(fd)
        self._fd = fd

    # ------------------------------------------------------------ object stores

    def _lease_fs(self):
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(self.exp_path)
        return fs, f"{path.rstrip('/')}/{LEASE_FILE}"

    def _read_lease(self) -> str | None:
        fs, path = self._lease_fs()
        try:
            with fs.open_input_stream(path) as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return None

    def _write_lease(self) -> None:
        fs, path = self._lease_fs()
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self.holder.heartbeat = time.time()
        with fs.open_output_stream(path) as f:
            f.write(self.holder.to_json().encode())

    def _is_live(self, other: Holder) -> bool:
        if other.on_this_host_and_gone():
            return False
        return time.time() - other.heartbeat < self.stale_s

    def _acquire_lease(self) -> None:
        current = Holder.parse(self._read_lease())
        if current is not None and self._is_live(current):
            age = time.time() - current.heartbeat
            raise _in_use(self.exp_path, current, f", last heartbeat {age:.0f}s ago")
        if current is not None:
            logger.warning("taking over the stale lease of %s (%s, last heartbeat %.0fs ago)",
                           self.exp_path, current.describe(), time.time() - current.heartbeat)
        self._write_lease()
        time.sleep(self.settle_s)
        winner = Holder.parse(self._read_lease())
        if winner is None or winner.token != self.holder.token:
            raise _in_use(self.exp_path, winner, " (it took the lease at the same moment)")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="simpo-ray-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = Holder.parse(self._read_lease())
                if current is not None and current.token != self.holder.token:
                    logger.warning("the lease of %s was taken over by %s; this search no longer "
                                   "holds it", self.exp_path, current.describe())
                    return
                self._write_lease()
            except Exception as e:  # noqa: BLE001 - keep trying; a missed beat is not fatal
                logger.warning("lease heartbeat for %s failed: %s (retrying)", self.exp_path, e)
