"""Disk space for a search: what its checkpoints need, checked before it starts and watched while it runs.

Each trial's Train run keeps up to `search.checkpoint_keep` checkpoints plus its latest, and
keeps them after the trial ends (the best one is exported at the end). A checkpoint is the
model's fp32 weights and AdamW's two moments (12 bytes a parameter, all workers' shards
together) plus small files (DCP's metadata, RNG states, trainer_state.json, the config).

- Before the search (`check`): refused in one line when the storage cannot hold one more
  checkpoint for every trial running at once (`Need.in_flight`); one warning line when it cannot
  hold what the whole search keeps (`Need.whole`).
- While it runs (`searcher.DiskWatch`, a Tune callback in the driver, calling `low`): when the free space of the storage
  (or of the temporary directory where workers stage their checkpoints, if that is another
  file system) falls below `Need.in_flight`, the search is stopped the way Ctrl-C stops it (Tune
  saves its state, the trials that finished keep their rows, the cut ones are `interrupted`),
  before a write fails, and `run_search` ends with `SearchStopped` naming what to free.

URIs (s3://, gs://) are not measured: object stores do not fill like a disk.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

from simpo_ray.errors import UserError
from simpo_ray.io import is_uri

MB = 2**20
# Tune's experiment state, the searcher's state, trials.csv, curves.csv and the histories.
MARGIN = 32 * MB
# Per checkpoint beside the tensors: .metadata (about 30 KB for the bundled models, 1 KB a tensor
# at real size), rng_state_<rank>.pt, trainer_state.json, train_config.yaml, DCP's headers.
CHECKPOINT_FILES = 1 * MB
BYTES_PER_PARAM = 12  # fp32 weights + AdamW's exp_avg and exp_avg_sq
# Why the watch stops a search: {storage root: message}, set by `low`, read by `stopped`.
_STOPPED: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class Need:
    checkpoint: int  # bytes of one trial checkpoint (all workers' shards)
    in_flight: int  # one more checkpoint for each trial running at once, + MARGIN
    whole: int  # every trial's kept checkpoints + the exported best model (fp32) + MARGIN
    what: str  # how `whole` was counted, for people

    @classmethod
    def of(cls, params: float, *, trials: int, slots: int, keep: int) -> Need:
        ckpt = int(params * BYTES_PER_PARAM) + CHECKPOINT_FILES
        whole = trials * (keep + 1) * ckpt + int(params * 4) + MARGIN
        return cls(checkpoint=ckpt, in_flight=slots * ckpt + MARGIN, whole=whole,
                   what=f"{trials} trials x up to {keep + 1} checkpoints of {size(ckpt)}")


def need(space, slots: int) -> Need | None:
    """What a search of `space` with `slots` trials at once writes; None when the model's size is unknown."""
    from simpo_ray.train.memory import shape_for

    try:
        shape = shape_for(space.default_config(), space.estimate.params_billion if space.estimate else None)
    except (UserError, OSError, ValueError):
        return None
    return Need.of(shape.total_params, trials=space.search.num_samples, slots=slots,
                   keep=space.search.checkpoint_keep)


def size(n: float) -> str:
    """Bytes for people, in the units the memory plan uses (GB = 1e9 bytes, MB = 1e6)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def free_bytes(path: str) -> int | None:
    """Free bytes of the file system holding `path` (its nearest existing ancestor); None for a URI."""
    if is_uri(path):
        return None
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def watched(root: str) -> list[str]:
    """The storage root, and the temporary directory when it is on another file system (workers
    stage each checkpoint there before Ray Train copies it to the storage)."""
    if is_uri(root):
        return []
    paths = [root]
    tmp = tempfile.gettempdir()
    try:
        if _device(tmp) != _device(root):
            paths.append(tmp)
    except OSError:
        pass
    return paths


def _device(path: str) -> int:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.stat(path).st_dev


def check(space, root: str, slots: int) -> str | None:
    """Before a search: `UserError` when a path in `watched(root)` cannot take one more checkpoint
    per trial in flight; a warning line when the storage cannot hold what the whole search keeps."""
    n = need(space, slots)
    if n is None:
        return None
    for path in watched(root):
        free = free_bytes(path)
        if free is not None and free < n.in_flight:
            raise UserError(f"{path} has {size(free)} free; the search needs at least {size(n.in_flight)} "
                            f"there ({slots} trial(s) at once x one {size(n.checkpoint)} checkpoint + "
                            f"{size(MARGIN)} for its records); free space or pass another --storage-path")
    free = free_bytes(root)
    if free is not None and free < n.whole:
        return (f"warning: {root} has {size(free)} free; the whole search may keep {size(n.whole)} "
                f"({n.what}); it stops (resumable) if the free space falls below {size(n.in_flight)}")
    return None


def describe(space, root: str, slots: int) -> str:
    """The dry run's line: what the search writes, and what `root` has free."""
    n = need(space, slots)
    if n is None:
        return "disk: not counted (the model's size is unknown)"
    free = free_bytes(root)
    has = f"{root} has {size(free)} free" if free is not None else f"{root} is not measured (a URI)"
    return (f"disk: up to {size(n.whole)} of checkpoints for the whole search ({n.what}), at least "
            f"{size(n.in_flight)} free while it runs; {has}")


def low(root: str, reserve: int) -> str | None:
    """Why a search on `root` must stop now (a watched path has less than `reserve` bytes
    free), remembered for `stopped`; None while there is room."""
    for path in watched(root):
        free = free_bytes(path)
        if free is not None and free < reserve:
            _STOPPED[root] = (f"stopped before the disk filled: {path} has {size(free)} free, less than the "
                              f"{size(reserve)} the running trials' next checkpoints and the search's records need")
            return _STOPPED[root]
    return None


def stopped(root: str) -> str | None:
    """Why the watch stopped the search on `root` (and forget it); None when it did not."""
    return _STOPPED.pop(root, None)
