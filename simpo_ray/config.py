"""One training run's configuration: `TrainConfig`, in the SimPO reference trainer's key names."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from simpo_ray import schema
from simpo_ray.errors import ConfigError
from simpo_ray.schema import rng as _range

LossType = Literal["sigmoid", "hinge"]
SchedulerType = Literal["cosine", "linear", "constant", "constant_with_warmup"]


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
    # HF TrainingArguments' key: here `torch.compile` of the per-chunk log-prob head (the
    # vocabulary-bound part of the step), one graph per chunk size, eager if compiling fails.
    # null (the default): on for vocabularies of 32k tokens or more, where it measurably helps
    # (128k: 1.17x faster steps, 0.70x step memory on CPU; bench/step_vs_trl.py), off below
    # (the bundled models' 51 tokens: 1.18x slower, and ~7 s of compiling per trial).
    torch_compile: bool | None = None
    # The reference trainer turns dropout off (`disable_dropout: true`): SimPO's log-prob
    # comparisons are then deterministic, and a resumed run equals an uninterrupted one.
    disable_dropout: bool = True
    # A Jinja chat template replacing the tokenizer's (the reference's gemma-2 configs set one).
    chat_template: str | None = None

    # Data
    dataset_mixer: dict[str, float] = field(default_factory=lambda: {"bundled:sort": 1.0})
    dataset_splits: list[str] = field(default_factory=lambda: ["train_prefs", "test_prefs"])
    max_length: int = field(default=1024, metadata=_range(2))
    max_prompt_length: int = field(default=512, metadata=_range(1))
    max_train_samples: int | None = field(default=None, metadata=_range(1))
    max_eval_samples: int | None = field(default=None, metadata=_range(1))
    preprocessing_num_workers: int | None = field(default=None, metadata=_range(1))
    # A single data file has no eval split: this share of its rows is held out for evaluation.
    eval_holdout_fraction: float = field(default=0.05, metadata=_range(0, 0.5, low_open=True))
    # The reference's (alignment-handbook DataArguments) rule: an empty system turn goes in front
    # of a prompt without one when the chat template mentions "system" or "<|im_start|>".
    auto_insert_empty_system_msg: bool = True
    # False (the reference): the assistant header (the template's generation prompt) is part of
    # the labelled response. True: it is masked with the prompt, as TRL's DPOTrainer and earlier
    # simpo-ray versions do.
    mask_generation_prompt: bool = False

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
    # Generation quality, at step 0 and every eval_steps: the policy answers the first
    # generation_eval_samples held-out prompts (0: never), split across the workers; the bundled
    # task checks them (eval/success_rate) and a reward model (an AutoModelForSequenceClassification
    # with one output, or bundled:reward) scores them against a baseline answer per prompt: the
    # dataset's chosen answer, or the step-0 model's (initial). max_new_tokens: None is the
    # bundled task's answer budget, else 512. Greedy unless generation_do_sample (seeded by seed).
    generation_eval_samples: int = field(default=64, metadata=_range(0))
    # How often generation runs (a multiple of eval_steps; None: every eval). Reports between
    # carry the last measured values, with eval/generation_step saying when they were measured.
    generation_eval_steps: int | None = field(default=None, metadata=_range(1))
    # Prompts per generate() call (None: a worker's whole share at once; decoding is memory-bound,
    # so one batch costs about what one prompt does).
    generation_batch_size: int | None = field(default=None, metadata=_range(1))
    reward_model_name_or_path: str | None = None
    reward_baseline: Literal["chosen", "initial"] = "chosen"
    max_new_tokens: int | None = field(default=None, metadata=_range(1))
    generation_do_sample: bool = False
    generation_temperature: float = field(default=1.0, metadata=_range(0, None, low_open=True))
    generation_top_p: float = field(default=1.0, metadata=_range(0, 1, low_open=True))
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
    # How the workers share the model: DDP (a full copy each), FSDP2 (sharded), or auto (DDP when
    # the memory plan fits one GPU, else FSDP). fsdp_cpu_offload keeps FSDP's parameter and
    # optimizer shards in CPU memory.
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    fsdp_cpu_offload: bool = False

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> TrainConfig:
        return from_dict({**self.to_dict(), **overrides})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

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
    return schema.build(TrainConfig, data, ignored=IGNORED_REFERENCE_KEYS)


def load_train_config(path_or_dict: str | Path | dict[str, Any]) -> TrainConfig:
    """Load a training config from a YAML file (safe loader) or a mapping.

    Keys of the reference trainer that have no meaning here are named in one warning line.
    """
    if isinstance(path_or_dict, dict):
        data, source = path_or_dict, "config"
    else:
        source = str(path_or_dict)
        data = schema.read_yaml(Path(path_or_dict))
    with schema.naming_file(source):
        cfg = from_dict(data, source=source)
    ignored = sorted(k for k in data if k in IGNORED_REFERENCE_KEYS)
    if ignored:
        print(f"warning: {source}: ignored (the reference trainer's own settings, no meaning here): "
              f"{', '.join(ignored)}", file=sys.stderr)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    schema.validate(cfg)
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
    if cfg.generation_eval_steps is not None and cfg.generation_eval_steps % cfg.eval_steps:
        raise ConfigError(f"generation_eval_steps: {cfg.generation_eval_steps} must be a multiple of "
                          f"eval_steps ({cfg.eval_steps})")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise ConfigError(f"max_steps: {cfg.max_steps} is out of range; allowed -1 (use epochs) or >= 1")


@dataclass(frozen=True)
class Resources:
    """Resources of ONE trial (or one training run): a Ray Train run of `num_workers` workers."""

    num_workers: int = field(default=1, metadata=_range(1))
    cpus_per_worker: float = field(default=1.0, metadata=_range(0, low_open=True))
    gpus_per_worker: float = field(default=0.0, metadata=_range(0))
    gpu_memory_gb: float | None = field(default=None, metadata=_range(0, low_open=True))  # per GPU

    def __post_init__(self) -> None:
        schema.validate(self)
        g = self.gpus_per_worker
        if g > 1 and not float(g).is_integer():
            raise ConfigError(f"gpus_per_worker: {g:g} is not allowed; above 1 it must be a whole number")

    @property
    def gpus_per_trial(self) -> float:
        return self.num_workers * self.gpus_per_worker

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def worker_bundle(self) -> dict[str, float]:
        """One worker's Ray resource bundle (capitalised names, zeros dropped)."""
        b = {"CPU": float(self.cpus_per_worker), "GPU": float(self.gpus_per_worker)}
        return {k: v for k, v in b.items() if v > 0}

    def describe(self) -> str:
        return f"{self.num_workers} worker(s) x {self.cpus_per_worker:g} CPU + {self.gpus_per_worker:g} GPU"
