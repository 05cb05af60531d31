"""One training run's configuration, in the SimPO reference trainer's key names.

A config is data: a YAML mapping validated into a typed `TrainConfig`. Every error names
the key, the value and what is allowed, so a user can fix the file without reading code.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from simpo_ray.errors import ConfigError, closest

LossType = Literal["sigmoid", "hinge"]
SchedulerType = Literal["cosine", "linear", "constant", "constant_with_warmup"]


def _range(low: float | None = None, high: float | None = None, *, low_open: bool = False):
    """Field metadata: the value must lie in [low, high] (or (low, high] with low_open)."""
    return {"range": (low, high, low_open)}


@dataclass
class TrainConfig:
    """Everything one SimPO training run needs. Defaults train the bundled CPU task."""

    # Model
    model_name_or_path: str = "bundled:tiny"
    tokenizer_name_or_path: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    bf16: bool = False
    gradient_checkpointing: bool = False

    # Data
    dataset_mixer: dict[str, float] = field(default_factory=lambda: {"bundled:sort": 1.0})
    dataset_splits: list[str] = field(default_factory=lambda: ["train_prefs", "test_prefs"])
    max_length: int = field(default=1024, metadata=_range(2))
    max_prompt_length: int = field(default=512, metadata=_range(1))
    max_train_samples: int | None = field(default=None, metadata=_range(1))
    max_eval_samples: int | None = field(default=None, metadata=_range(1))
    preprocessing_num_workers: int | None = field(default=None, metadata=_range(1))

    # SimPO
    learning_rate: float = field(default=5e-7, metadata=_range(0, None, low_open=True))
    beta: float = field(default=2.0, metadata=_range(0, None, low_open=True))
    gamma_beta_ratio: float = field(default=0.5, metadata=_range(0))
    sft_weight: float = field(default=0.0, metadata=_range(0))
    loss_type: LossType = "sigmoid"
    label_smoothing: float = field(default=0.0, metadata=_range(0, 0.5))

    # Optimisation and schedule
    num_train_epochs: float = field(default=1.0, metadata=_range(0, None, low_open=True))
    max_steps: int = -1
    per_device_train_batch_size: int = field(default=2, metadata=_range(1))
    per_device_eval_batch_size: int = field(default=4, metadata=_range(1))
    gradient_accumulation_steps: int = field(default=1, metadata=_range(1))
    warmup_ratio: float = field(default=0.1, metadata=_range(0, 1))
    lr_scheduler_type: SchedulerType = "cosine"
    max_grad_norm: float = field(default=1.0, metadata=_range(0))
    weight_decay: float = field(default=0.0, metadata=_range(0))
    seed: int = 42

    # Evaluation, logging, checkpoints
    eval_steps: int = field(default=100, metadata=_range(1))
    logging_steps: int = field(default=10, metadata=_range(1))
    generation_eval_samples: int = field(default=64, metadata=_range(0))
    save_steps: int | None = field(default=None, metadata=_range(1))
    save_total_limit: int = field(default=2, metadata=_range(1))
    output_dir: str | None = None
    divergence_loss_threshold: float | None = field(default=None, metadata=_range(0, None, low_open=True))
    # A step loss above divergence_factor x the mean loss of the first 10 steps (floored at 1.0)
    # counts as an explosion; None turns the relative check off.
    divergence_factor: float | None = field(default=10.0, metadata=_range(1, None, low_open=True))

    # Resources of one run
    num_workers: int = field(default=1, metadata=_range(1))
    use_gpu: bool | None = None

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> TrainConfig:
        return from_dict({**self.to_dict(), **overrides})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)

# Keys of the reference trainer's configs (alignment-handbook / princeton-nlp/SimPO) that
# configure its own infrastructure (hub upload, logging backends, saving) and have no
# meaning here. They are accepted and ignored so those configs load as they are.
IGNORED_REFERENCE_KEYS = frozenset({
    "hub_model_id", "push_to_hub", "report_to", "run_name", "logging_first_step",
    "log_level", "save_strategy", "evaluation_strategy", "eval_strategy", "do_eval",
    "overwrite_output_dir", "torch_dtype", "use_flash_attention_2", "optim",
    "gradient_checkpointing_kwargs", "trainer_type", "model_revision", "remove_unused_columns",
})


def from_dict(data: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Build a `TrainConfig` from a mapping, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    known: dict[str, Any] = {}
    for key, value in data.items():
        if key in FIELDS:
            known[key] = _coerce(key, value, _HINTS[key])
        elif key not in IGNORED_REFERENCE_KEYS:
            raise ConfigError(f"{source}: unknown key '{key}'{closest(str(key), FIELDS)}")
    return TrainConfig(**known)


def load_train_config(path_or_dict: str | Path | dict[str, Any]) -> TrainConfig:
    """Load a training config from a YAML file (safe loader) or a mapping."""
    if isinstance(path_or_dict, dict):
        return from_dict(path_or_dict)
    path = Path(path_or_dict)
    return from_dict(read_yaml(path), source=str(path))


def read_yaml(path: Path) -> Any:
    """Read a YAML file with the safe loader; one-line errors for missing or malformed files."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    return {} if data is None else data


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is not None:
        return str(hint).replace("typing.", "")
    return hint.__name__


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the annotation; YAML's '5e-7' string is read as a float."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    bad = ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads '5e-7' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is dict:
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"{key}: expected a non-empty mapping, got {value!r}")
        key_t, val_t = args
        return {_coerce(f"{key}.{k}", k, key_t): _coerce(f"{key}.{k}", v, val_t) for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise bad
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    raise TypeError(f"unsupported annotation for {key}: {hint}")  # a bug in this file, not user input


def _validate(cfg: TrainConfig) -> None:
    for name, f in FIELDS.items():
        value = getattr(cfg, name)
        # Direct construction (TrainConfig(beta='x')) goes through the same type checks.
        value = _coerce(name, value, _HINTS[name])
        object.__setattr__(cfg, name, value)
        if "range" in f.metadata and value is not None:
            low, high, low_open = f.metadata["range"]
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name}: {value} is not a finite number")
            too_low = low is not None and (value <= low if low_open else value < low)
            too_high = high is not None and value > high
            if too_low or too_high:
                lo = "(" if low_open else "["
                raise ConfigError(f"{name}: {value} is out of range; allowed {lo}{_fmt(low)}, {_fmt(high)}]")
    if cfg.loss_type == "hinge" and cfg.label_smoothing > 0:
        raise ConfigError(
            f"label_smoothing: {cfg.label_smoothing} cannot be used with loss_type 'hinge'; "
            "label smoothing is defined for the sigmoid loss only (set it to 0.0)"
        )
    if cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(
            f"max_prompt_length: {cfg.max_prompt_length} must be smaller than max_length ({cfg.max_length})"
        )
    for name, frac in cfg.dataset_mixer.items():
        if not (0 < frac <= 1):
            raise ConfigError(f"dataset_mixer.{name}: fraction {frac} is out of range; allowed (0, 1]")
    if len(cfg.dataset_splits) != 2:
        raise ConfigError(
            f"dataset_splits: expected [train_split, eval_split], got {cfg.dataset_splits!r}"
        )
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise ConfigError(f"max_steps: {cfg.max_steps} is out of range; allowed -1 (use epochs) or >= 1")


def _fmt(x: float | None) -> str:
    return "inf" if x is None else f"{x:g}"
