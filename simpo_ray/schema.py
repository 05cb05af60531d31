"""Validate parsed YAML into typed dataclasses: the one validator for every config shape.

A field's type hint says what is allowed and `field(metadata=rng(low, high))` adds a range;
`build(cls, data)` checks a mapping against them. Every error is one `ConfigError` line that
names the key, the value and what is allowed (with "did you mean" for unknown keys).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from simpo_ray.errors import ConfigError, closest

# An unknown key's message lists the allowed keys when there are at most this many.
_LIST_ALLOWED_UP_TO = 16


def rng(low: float | None = None, high: float | None = None, *, low_open: bool = False,
        high_open: bool = False) -> dict:
    """Field metadata: the value must lie in [low, high]; `low_open` / `high_open` leave out that end."""
    return {"range": (low, high, low_open, high_open)}


def mapping(raw: Any, fld: str) -> dict:
    """`raw` as a mapping (None is empty); else an error naming `fld`."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        where = f"{fld}: " if fld else ""
        raise ConfigError(f"{where}expected a mapping, got {raw!r} ({type(raw).__name__})")
    return raw


def check_keys(data: dict, allowed: Iterable[str], prefix: str = "",
               known: Callable[[str], str | None] | None = None) -> None:
    """Refuse a key not in `allowed`, suggesting the closest one. `known(key)`: what to say
    instead of that suggestion of a key known elsewhere (another trainer's), None for a typo: a
    near spelling of another meaning would mislead (`dataloader_num_workers` is not `num_workers`)."""
    allowed = tuple(allowed)
    for key in data:
        if key not in allowed:
            listed = f"; allowed: {', '.join(allowed)}" if len(allowed) <= _LIST_ALLOWED_UP_TO else ""
            hint = known(str(key)) if known is not None else None
            raise ConfigError(f"{prefix}{key}: unknown key{closest(str(key), allowed) if hint is None else hint}{listed}")


def one_of(raw: Any, fld: str, choices: Iterable[str], extra: str = "") -> str:
    """`raw` if it is one of `choices`; else an error listing them (and the closest)."""
    choices = tuple(choices)
    if raw not in choices:
        raise ConfigError(f"{fld}: {raw!r} is not allowed{closest(str(raw), choices)}; "
                          f"choose one of {', '.join(choices)}{extra}")
    return raw


def check_range(fld: str, value: float, low: float | None, high: float | None,
                low_open: bool = False, high_open: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{fld}: {value} is not a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{fld}: {value:g} is out of range; allowed {lo}, {hi}")


def coerce(fld: str, value: Any, hint: Any) -> Any:
    """`value` checked against the type `hint`; YAML's '5e-7' (read as a string) becomes a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(fld, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{fld}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        names = [str(a) for a in args]
        raise ConfigError(f"{fld}: {value!r} is not allowed{closest(str(value), names)}; "
                          f"choose one of {', '.join(names)}")
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build(hint, value, prefix=f"{fld}.")
    if origin is dict:
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"{fld}: expected a non-empty mapping, got {value!r}")
        key_t, val_t = args
        return {coerce(f"{fld}.{k}", k, key_t): coerce(f"{fld}.{k}", v, val_t) for k, v in value.items()}
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{fld}: expected a list, got {value!r} ({type(value).__name__})")
        items = [coerce(f"{fld}[{i}]", v, args[0]) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if hint is Any:
        return value
    ok = _SCALARS.get(hint)
    if ok is None:
        raise TypeError(f"unsupported annotation for {fld}: {hint}")  # a bug here, not user input
    converted = ok(value)
    if converted is _BAD:
        raise ConfigError(f"{fld}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    return converted


_BAD = object()


def _to_bool(v: Any) -> Any:
    return v if isinstance(v, bool) else _BAD


def _to_int(v: Any) -> Any:
    if isinstance(v, bool):
        return _BAD
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return _BAD


def _to_float(v: Any) -> Any:
    if isinstance(v, bool):
        return _BAD
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):  # PyYAML reads '5e-7' (no dot) as a string
        try:
            return float(v)
        except ValueError:
            return _BAD
    return _BAD


def _to_str(v: Any) -> Any:
    return v if isinstance(v, str) and v else _BAD


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string",
          type(None): "null"}


def _type_name(hint: Any) -> str:
    if hint in _NAMES:
        return _NAMES[hint]
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return str(hint).replace("typing.", "")


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def validate(obj: Any, prefix: str = "") -> None:
    """Check (and normalise in place) every field of a dataclass instance: type, then range.

    Dataclasses call this from `__post_init__`, so direct construction is checked too.
    """
    types_ = hints(type(obj))
    for f in dataclasses.fields(obj):
        fld = f"{prefix}{f.name}"
        value = coerce(fld, getattr(obj, f.name), types_[f.name])
        object.__setattr__(obj, f.name, value)
        if "range" in f.metadata and value is not None:
            check_range(fld, value, *f.metadata["range"])


def build(cls: type, data: Any, *, prefix: str = "", ignored: Collection[str] = frozenset(),
          known: Callable[[str], str | None] | None = None) -> Any:
    """An instance of dataclass `cls` from a mapping: unknown keys refused (`known`: as
    `check_keys`), others coerced.

    Keys in `ignored` are dropped silently (a caller may warn about them). Missing keys take the
    dataclass defaults; a required field that is missing is an error naming it.
    """
    data = mapping(data, prefix.rstrip("."))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_keys({k: v for k, v in data.items() if k not in ignored}, fields, prefix, known)
    types_ = hints(cls)
    kwargs = {k: coerce(f"{prefix}{k}", v, types_[k]) for k, v in data.items() if k in fields}
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: missing (required)")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if not prefix or msg.startswith(prefix) else f"{prefix}{msg}") from None


MAX_YAML_BYTES = 1 << 20  # configs and spaces are a few KB; anything near this is a mistake


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing what a config never needs and a hostile file abuses:
    aliases (`*a`: nested ones expand exponentially) and duplicate keys (the last would win)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are "
                              "not allowed in a config; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"duplicate key {key!r} at lines {seen[key]} and {line}; keep one")
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """Read a YAML config: safe loader, no aliases, no duplicate keys, UTF-8, at most 1 MiB.

    Every problem is one `ConfigError` line naming the file (and the line or byte offset).
    """
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {size / 2**20:.1f} MiB is too large for a config "
                              f"(limit {MAX_YAML_BYTES // 2**20} MiB)")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start}") from None
    with naming_file(path):
        try:
            data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"malformed YAML{where}: {problem}") from None
    return {} if data is None else data


@contextlib.contextmanager
def naming_file(path: str | Path) -> Iterator[None]:
    """Prefix a `ConfigError` raised inside with the file it is about (once)."""
    try:
        yield
    except ConfigError as e:
        msg, where = str(e), str(path)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Dotted or nested overrides applied to a copy of the raw mapping (mappings merge)."""
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not a mapping")
            node = nxt
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = _merge(node[last], value)
        else:
            node[last] = copy.deepcopy(value)
    return data


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out
