"""A run's history.jsonl: every report of a Ray Train run, one JSON object a line, in order.

Train V2's `Result` keeps only the reports that carried a checkpoint, and Tune's own result
file does not survive a resume; this file keeps the whole learning curve of every attempt. One
writer (`history_callback`, a Train callback in the run's controller, used by
`python -m simpo_ray.train` and by every trial of a search) and one reader (`read_history`),
with one rule for damage: a line that does not parse (a crash mid-append) is skipped with a
warning naming the file; the writer starts every append on a fresh line, so such a line never
swallows the next report.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from simpo_ray.io import Storage

log = logging.getLogger(__name__)
HISTORY_FILE = "history.jsonl"


def history_callback(path: str | os.PathLike):
    """A Ray Train `UserCallback` appending rank 0's metrics of each report (with
    `checkpoint_path` when the report saved one) to `path` (a local file or a URI)."""
    from ray.train import UserCallback

    directory, name = os.path.split(os.fspath(path))

    class History(UserCallback):
        def __init__(self) -> None:
            self.storage = Storage(directory)

        def after_report(self, run_context, metrics, checkpoint) -> None:
            row = dict(metrics[0])
            if checkpoint is not None:
                row["checkpoint_path"] = checkpoint.path
            self.storage.append_text(name, fresh_line(self.storage, name) + json.dumps(row, default=float) + "\n")

    return History()


def fresh_line(storage: Storage, name: str) -> str:
    """"\\n" when the file ends inside a line (a crash mid-append), else ""."""
    if storage.is_remote:
        text = storage.read_text(name)
        return "\n" if text and not text.endswith("\n") else ""
    try:
        with open(storage.path(name), "rb") as f:
            f.seek(-1, os.SEEK_END)
            return "" if f.read(1) == b"\n" else "\n"
    except (FileNotFoundError, OSError):  # missing or empty
        return ""


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The reports in a history.jsonl (a local file or a URI); [] when there is none."""
    directory, name = os.path.split(os.fspath(path))
    text = Storage(directory).read_text(name)
    rows, damaged = [], 0
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            damaged += 1
    if damaged:
        log.warning("%s: %d line(s) cut short by a crash skipped", path, damaged)
    return rows
