"""Where results live, and writing them safely.

`Storage`: one results location, a local directory or any URI that pyarrow (and so Ray)
accepts (`s3://`, `gs://`, ...). It is the one place that tells the two apart; every module
that reads or writes results goes through it. Local writes are atomic (`write_text_atomic`: a
crash mid-write leaves the previous file intact); object stores replace an object atomically.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from simpo_ray.errors import ConfigError


def is_uri(location: str | os.PathLike) -> bool:
    """True for a pyarrow filesystem URI (`s3://...`), False for a local path."""
    return "://" in str(location)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")


def write_csv_atomic(path: str | os.PathLike, frame: Any) -> Path:
    """Write a pandas DataFrame as CSV atomically."""
    return write_text_atomic(path, frame.to_csv(index=False))


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)


NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str, what: str = "--name") -> str:
    """`name` when it is one safe path component under the storage path (letters, digits, '.',
    '_', '-'; starting with a letter or digit; at most 128 characters), else one-line `UserError`:
    an experiment or run name never reaches outside its storage path (`../x`, `/abs`, `a/b`) nor
    splits a line of output."""
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
        raise ConfigError(f"{what}: {name!r} is not allowed; a name is one path component of letters, "
                        "digits, '.', '_' and '-', starting with a letter or digit (at most 128 characters)")
    return name


class Storage:
    """A results location: `Storage(root)` with `root` a local directory or a URI. Paths given
    to its methods are relative to the root ("search.json", "train_runs/x/history.jsonl")."""

    def __init__(self, root: str | os.PathLike) -> None:
        root = str(root)
        self.root = root.rstrip("/") if is_uri(root) else os.path.abspath(os.path.expanduser(root))

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    @property
    def is_remote(self) -> bool:
        return is_uri(self.root)

    def path(self, *parts: str) -> str:
        """The full path (or URI) of `parts` under the root."""
        return "/".join([self.root, *(p.strip("/") for p in parts if p)])

    def child(self, *parts: str) -> Storage:
        return Storage(self.path(*parts))

    def _fs(self, rel: str):
        import pyarrow.fs

        return pyarrow.fs.FileSystem.from_uri(self.path(rel))

    def read_text(self, rel: str) -> str | None:
        """The text of `rel`, or None when there is no such file."""
        data = self.read_bytes(rel)
        return None if data is None else data.decode()

    def read_bytes(self, rel: str) -> bytes | None:
        """The bytes of `rel`, or None when there is no such file."""
        if not self.is_remote:
            try:
                return Path(self.path(rel)).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return None
        fs, path = self._fs(rel)
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_text(self, rel: str, text: str) -> None:
        """Replace `rel` with `text` atomically (object stores replace an object atomically)."""
        if not self.is_remote:
            write_text_atomic(self.path(rel), text)
            return
        fs, path = self._fs(rel)
        parent = path.rsplit("/", 1)[0]
        if parent and parent != path:
            fs.create_dir(parent, recursive=True)  # a filesystem needs it; an object store ignores it
        with fs.open_output_stream(path) as f:
            f.write(text.encode())

    def append_text(self, rel: str, text: str) -> None:
        """Add `text` at the end of `rel` (a local append; an object is rewritten whole)."""
        if self.is_remote:
            self.write_text(rel, (self.read_text(rel) or "") + text)
            return
        target = Path(self.path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a") as f:
            f.write(text)

    def exists(self, rel: str = "") -> bool:
        if not self.is_remote:
            return os.path.exists(self.path(rel))
        import pyarrow.fs

        fs, path = self._fs(rel)
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def names(self, prefix: str = "") -> list[str]:
        """Sorted names of the root's direct entries that start with `prefix`."""
        if not self.is_remote:
            try:
                return sorted(n for n in os.listdir(self.root) if n.startswith(prefix))
            except FileNotFoundError:
                return []
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(self.root)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.base_name.startswith(prefix))
