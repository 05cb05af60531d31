"""The on-disk cache shared by tokenised data and bundled models: where it is, and building an
entry once per cache, safely across processes."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """``$SIMPO_RAY_CACHE`` or ``~/.cache/simpo_ray``."""
    return Path(os.environ.get("SIMPO_RAY_CACHE") or Path.home() / ".cache" / "simpo_ray")


def build_once(final: Path, build: Callable[[Path], None], *, marker: str | None = None) -> bool:
    """Make sure the directory ``final`` exists, calling ``build(tmp_dir)`` if it does not.

    It is complete when ``final/marker`` exists (``marker=None``: when ``final`` exists).
    Builders serialise on a ``flock`` of ``.<name>.lock`` beside it and build into a temp dir
    that is renamed into place, so a reader never sees a half-written entry and concurrent
    callers build it once; a failed build leaves nothing behind. Returns True if this call built it.
    """
    done = (lambda: (final / marker).is_file()) if marker else final.is_dir
    if done():
        return False
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done():  # another process built it while we waited
            return False
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            build(tmp)
            if final.exists():  # incomplete (no marker), e.g. from a crash in an old version
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True
