"""A single-worker run in the calling process, persisted as a Ray Train run is.

Ray Train's local mode (`ScalingConfig(num_workers=0)`) runs the training function in the
process that calls `fit()`, without the controller actor, the worker process and their placement
group: for a Tune trial, four of the seven processes a trial starts. Inside a Tune trial Ray
refuses its worker APIs (`ray.train.get_context` and the rest raise), and local mode keeps
nothing anyway (its reports and checkpoints go nowhere), so a trial runs the loop itself
(`launch.run_in_process`, `train.worker.InProcessWorker`) and `LocalRun` does what Train's
controller does for a run, with the same files in the same places, so that everything that reads
a Train run reads this one:

* each checkpoint is written into a staging directory of the run (`staging()`) and renamed to
  `<run_dir>/checkpoint_<timestamp>` (the name Train gives it) when reported, so a crash mid-write
  leaves no half checkpoint and nothing is copied;
* retention as `CheckpointConfig(num_to_keep, checkpoint_score_attribute, order)`: the `keep`
  best by the score, and the latest always (a restart resumes from it);
* every report is appended to `<run_dir>/history.jsonl` (with `checkpoint_path` when it saved one),
  then handed to `forward` (`ray.tune.report` in a search);
* a restart (the process died, or the training function raised and the caller runs it again)
  resumes from `latest_checkpoint()`.

Local storage only: a URI storage path keeps Train's own workers and persistence.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from simpo_ray.infra.history import HISTORY_FILE, fresh_line, read_history
from simpo_ray.io import Storage

CHECKPOINT_PREFIX = "checkpoint_"
_PARTIAL_PREFIX = ".partial-"


class LocalRun:
    """The persistence of one run whose training function reports through `report`."""

    def __init__(self, run_dir: str | os.PathLike, *, keep: int | None = None, score: str | None = None,
                 order: str = "max", forward: Callable[[dict[str, Any]], None] | None = None) -> None:
        if order not in ("max", "min"):
            raise ValueError(f"order must be max or min, got {order!r}")
        self.dir = Path(run_dir)
        self.keep, self.score, self.order, self.forward = keep, score, order, forward
        self.dir.mkdir(parents=True, exist_ok=True)
        self._history = Storage(str(self.dir))
        for partial in self.dir.glob(_PARTIAL_PREFIX + "*"):  # a copy a crash cut short
            shutil.rmtree(partial, ignore_errors=True)
        # Each checkpoint's score (by directory name), read from the history once, then kept up to date.
        self._scores = {Path(row["checkpoint_path"]).name: row.get(score) if score else None
                        for row in read_history(self.dir / HISTORY_FILE) if row.get("checkpoint_path")}

    def checkpoints(self) -> list[Path]:
        """This run's whole checkpoints, oldest first: by the step each saved (a name is local
        wall-clock time, which a clock set back reorders), then by name."""
        from simpo_ray.train.checkpoints import STATE_FILE, is_checkpoint, saved_counters

        found = [p for p in self.dir.glob(CHECKPOINT_PREFIX + "*")
                 if p.is_dir() and is_checkpoint(p) and (p / STATE_FILE).is_file()]
        steps = {p: (saved_counters(p) or {}).get("step", -1) for p in found}
        return sorted(found, key=lambda p: (steps[p], p.name))

    def latest_checkpoint(self) -> str | None:
        found = self.checkpoints()
        return str(found[-1]) if found else None

    @contextlib.contextmanager
    def staging(self):
        """A directory in the run's folder to write a checkpoint into; `report` takes it over by a
        rename (nothing copied, nothing large deleted while a stopped trial's loop unwinds). Left
        behind by a crash, it is dropped when the run next opens."""
        name = _PARTIAL_PREFIX + "staged-" + datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
        path = self.dir / name
        path.mkdir()
        try:
            yield str(path)
        finally:
            if path.exists():  # not reported (the loop raised before)
                shutil.rmtree(path, ignore_errors=True)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | os.PathLike | None = None) -> None:
        """Persist `checkpoint_dir` (a `staging()` directory is renamed into place; any other is
        copied, and the caller may delete it on return), record the report, keep the checkpoints
        retention keeps, then forward the report."""
        row = dict(metrics)
        if checkpoint_dir is not None:
            row["checkpoint_path"] = str(self._persist(Path(checkpoint_dir)))
            self._scores[Path(row["checkpoint_path"]).name] = row.get(self.score) if self.score else None
        self._history.append_text(HISTORY_FILE, fresh_line(self._history, HISTORY_FILE) + json.dumps(row, default=float) + "\n")
        if checkpoint_dir is not None:
            self._retain()
        if self.forward is not None:
            self.forward(row)

    def _persist(self, source: Path) -> Path:
        name = CHECKPOINT_PREFIX + datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
        final = self.dir / name
        while final.exists():  # two saves within a microsecond's clock tick
            name += "0"
            final = self.dir / name
        if source.parent == self.dir and source.name.startswith(_PARTIAL_PREFIX):
            os.replace(source, final)  # written in place by the loop: whole once renamed
            return final
        partial = self.dir / (_PARTIAL_PREFIX + name)
        shutil.copytree(source, partial)
        os.replace(partial, final)
        return final

    def _retain(self) -> None:
        """Delete the checkpoints neither among the `keep` best by `score` nor the latest."""
        if not self.keep:
            return
        found = self.checkpoints()
        if len(found) <= self.keep:
            return
        if self.score:
            def rank(item: tuple[int, Path]) -> tuple:  # best first; unscored or non-finite last, newer first
                age, p = item
                value = self._scores.get(p.name)
                good = isinstance(value, (int, float)) and math.isfinite(value)
                return (0 if good else 1, (-value if self.order == "max" else value) if good else 0.0, -age)
            kept = {p for _, p in sorted(enumerate(found), key=rank)[: self.keep]}
        else:
            kept = set(found[-self.keep:])
        kept.add(found[-1])
        for path in found:
            if path not in kept:
                shutil.rmtree(path, ignore_errors=True)
