"""One training run's configuration: `TrainConfig`, in the SimPO reference trainer's key names."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
from collections.abc import Callable
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
    # A Hub revision (branch, tag or commit) of the model: `revision=` of every from_pretrained of
    # its config, weights and tokenizer (alignment-handbook's key); refused for a local model.
    model_revision: str | None = None
    tokenizer_name_or_path: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    bf16: bool = False
    # The dtype the checkpoint is READ in where it is read (`train.model.read_dtype`): auto (as
    # stored), bfloat16 or float32; null: fp32. Training casts what it read to fp32 master
    # weights whatever this says (SimPO's 1e-7..1e-6 steps are below bf16's resolution of a
    # weight near 1: pure-bf16 updates vanish); the exported model is saved in it. float16 is
    # refused: read into fp32 it only loses bf16 checkpoints' range, and nothing here computes in it.
    torch_dtype: str | None = None
    # Liger Kernel's Triton kernels (RMSNorm, RoPE, SwiGLU) patched into the policy: CUDA only.
    use_liger_kernel: bool = False
    gradient_checkpointing: bool = False
    # HF TrainingArguments' key: here `torch.compile` of the per-chunk log-prob head (the
    # vocabulary-bound part of the step), one graph per chunk size, eager if compiling fails.
    # null (the default): on for vocabularies of 32k tokens or more, where it measurably helps
    # (128k: 1.17x faster steps, 0.70x step memory on CPU; bench/step_vs_trl.py), off below
    # (the bundled models' 51 tokens: 1.18x slower, and ~7 s of compiling per trial).
    # true: the head and each decoder block (train/blocks.py, as torchtitan compiles a model; the
    # blocks' speed on a GPU is not measured here, so only an explicit true turns them on).
    torch_compile: bool | None = None
    # The reference trainer turns dropout off (`disable_dropout: true`): SimPO's log-prob
    # comparisons are then deterministic, and a resumed run equals an uninterrupted one.
    disable_dropout: bool = True
    # A Jinja chat template replacing the tokenizer's (the reference's gemma-2 configs set one).
    chat_template: str | None = None

    # Data
    dataset_mixer: dict[str, float] = field(default_factory=lambda: {"bundled:sort": 1.0})
    dataset_splits: list[str] = field(default_factory=lambda: ["train_prefs", "test_prefs"])
    # Unset in a run's or a space's config: the smaller of 1024 and the model's position limit,
    # max_prompt_length then half of it (`default_lengths`).
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
    # Warmup in optimizer steps; above 0 it replaces warmup_ratio (HF's rule).
    warmup_steps: int = field(default=0, metadata=_range(0))
    max_grad_norm: float = field(default=1.0, metadata=_range(0))
    # The optimizer, in HF TrainingArguments' names and defaults: AdamW (`train.optim`).
    optim: str = "adamw_torch"
    adam_beta1: float = field(default=0.9, metadata=_range(0, 1, high_open=True))
    adam_beta2: float = field(default=0.999, metadata=_range(0, 1, high_open=True))
    adam_epsilon: float = field(default=1e-8, metadata=_range(0, None, low_open=True))
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
    # HF's key: where a search's learning curves go besides curves.csv and TensorBoard's event
    # files (always written): mlflow, wandb, all (those installed) or none (simpo_ray.search.loggers).
    report_to: str | list[str] | None = None
    save_steps: int | None = field(default=None, metadata=_range(1))
    save_total_limit: int = field(default=2, metadata=_range(1))
    # Where `python -m simpo_ray.train` saves the final model (a search refuses it: its trials'
    # models are their checkpoints). A non-empty directory written by another config is refused
    # unless overwrite_output_dir (`infra.launch.claim_output_dir`).
    output_dir: str | None = None
    overwrite_output_dir: bool = False
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

# Keys of the reference trainers' configs (princeton-nlp/SimPO, alignment-handbook, transformers'
# TrainingArguments) that configure only how that trainer runs (logging backends, run names, save
# and eval cadence, data-loader processes) and change nothing of what is trained here: accepted
# and named in one warning, so those configs load as they are.
IGNORED_REFERENCE_KEYS = frozenset({
    "hub_model_id", "run_name", "logging_first_step", "log_level", "save_strategy",
    "evaluation_strategy", "eval_strategy", "do_eval", "gradient_checkpointing_kwargs", "trainer_type",
    "remove_unused_columns", "dataloader_num_workers",
})


def _push_to_hub(data: dict) -> str:
    return ("simpo-ray uploads nothing (a long run should not fail at its end on the network); upload "
            f"the saved model afterwards: hf upload {data.get('hub_model_id') or '<repo id>'} "
            f"{data.get('output_dir') or '<output_dir>'}")


# Keys accepted (and ignored, as above) only at their inert value; any other value is refused in
# one line saying what to write instead.
INERT_ONLY: dict[str, tuple[Any, Callable[[dict], str]]] = {
    "push_to_hub": (False, _push_to_hub),
    "use_flash_attention_2": (False, lambda _: "write attn_implementation: flash_attention_2 instead"),
    "fp16": (False, lambda _: "fp16 mixed precision is not implemented; use bf16: true (bf16 compute over "
                              "fp32 weights) or neither (fp32)"),
}
ACCEPTED_REFERENCE_KEYS = IGNORED_REFERENCE_KEYS | frozenset(INERT_ONLY)

# Other trainers' keys with a counterpart of the same meaning here: the only "did you mean" such a
# key gets (a near spelling may mean something else: dataloader_num_workers is not num_workers).
SAME_MEANING = {
    "dataset_num_proc": ("preprocessing_num_workers", "TRL's name for it"),
    "cpo_alpha": ("sft_weight", "TRL's weight of the chosen answers' NLL"),
    "simpo_gamma": ("gamma_beta_ratio", ("TRL's absolute margin; here the margin is gamma_beta_ratio x "
                                         "beta, so gamma_beta_ratio = simpo_gamma / beta")),
}
# alignment-handbook's and TRL's keys with no counterpart here (adapters, quantised loading, TRL's
# own data handling): refused as such.
OTHER_TRAINER_KEYS = frozenset({
    "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
    "load_in_8bit", "load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant", "model_code_revision",
    "base_model_revision", "dataset_configs", "truncation_side", "text_column", "max_completion_length",
    "padding_value", "truncation_mode", "generate_during_eval", "is_encoder_decoder", "model_init_kwargs",
    "label_pad_token_id", "padding_free", "precompute_ref_log_probs",
})


def foreign_key(key: str) -> str | None:
    """What an unknown `key`'s error says when another trainer's config uses it (instead of a
    fuzzy "did you mean"); None for a name no trainer uses (a typo: the closest key is hinted)."""
    if key in SAME_MEANING:
        ours, why = SAME_MEANING[key]
        return f" (did you mean '{ours}'? {why})"
    if key in OTHER_TRAINER_KEYS:
        return ": a key of TRL's or alignment-handbook's trainer with no counterpart here"
    if key in _training_arguments():
        return ": a transformers TrainingArguments key with no counterpart here"
    return None


@functools.cache
def _training_arguments() -> frozenset[str]:
    """transformers' TrainingArguments keys (read on this error path only: the import takes seconds)."""
    try:
        from transformers import training_args

        return frozenset(f.name for f in dataclasses.fields(training_args.TrainingArguments))
    except (ImportError, AttributeError, TypeError):  # must not replace the error being reported
        return frozenset()


def from_dict(data: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Build a `TrainConfig` from a mapping, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    for key, (inert, instead) in INERT_ONLY.items():
        value = data.get(key, inert)
        if value not in (inert, None):
            shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as YAML writes it
            raise ConfigError(f"{key}: {shown} is not supported (allowed: {str(inert).lower()}); {instead(data)}")
    return schema.build(TrainConfig, data, ignored=ACCEPTED_REFERENCE_KEYS, known=foreign_key)


def load_train_config(path_or_dict: str | Path | dict[str, Any], *,
                      position_limit: Callable[[TrainConfig], tuple[int, str] | None] | None = None
                      ) -> TrainConfig:
    """Load a training config from a YAML file (safe loader) or a mapping.

    Keys of the reference trainer that have no meaning here are named in one warning line.
    `position_limit(cfg)`: the model's (positions, config key), or None; given, an unset
    `max_length` is the smaller of its default and the model's limit (`default_lengths`).
    """
    if isinstance(path_or_dict, dict):
        data, source = path_or_dict, "config"
    else:
        source = str(path_or_dict)
        data = schema.read_yaml(Path(path_or_dict))
    note = None
    with schema.naming_file(source):
        cfg = from_dict(data, source=source)
        if position_limit is not None and "max_length" not in data:
            cfg, note = default_lengths(cfg, position_limit(cfg), prompt_given="max_prompt_length" in data)
    ignored = sorted(k for k in data if k in ACCEPTED_REFERENCE_KEYS)
    if ignored:
        print(f"warning: {source}: ignored (the reference trainer's own settings, no meaning here): "
              f"{', '.join(ignored)}", file=sys.stderr)
    if note:
        print(f"note: {source}: {note}", file=sys.stderr)
    return cfg


def default_lengths(cfg: TrainConfig, limit: tuple[int, str] | None, *,
                    prompt_given: bool) -> tuple[TrainConfig, str | None]:
    """`cfg` of a config that leaves `max_length` unset: the smaller of the reference's default
    (1024) and the model's position limit `limit` ((positions, the config key stating them), None
    when unknown); an unset `max_prompt_length` scales with it (half). Returns the config and a
    line saying so (None when the default stands)."""
    default = FIELDS["max_length"].default
    if limit is None or limit[0] >= default:
        return cfg, None
    n, key = limit
    prompt = cfg.max_prompt_length if prompt_given else n // 2
    where = f"the position limit of model '{cfg.model_name_or_path}' ({key}: {n})"
    if prompt >= n:
        raise ConfigError(f"max_prompt_length: {prompt} must be smaller than max_length, which is unset and so "
                          f"{n}, {where}; set a smaller max_prompt_length")
    return (cfg.replace(max_length=n, max_prompt_length=prompt),
            f"max_length not set: {n}, {where}, below the default {default}"
            + ("" if prompt_given else f"; max_prompt_length {prompt} (half of it)"))


REPORT_TO = ("tensorboard", "mlflow", "wandb", "all", "none")


def _validate(cfg: TrainConfig) -> None:
    schema.validate(cfg)
    for name in [cfg.report_to] if isinstance(cfg.report_to, str) else cfg.report_to or []:
        schema.one_of(name, "report_to", REPORT_TO)
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
    _check_reference_choices(cfg)


# torch_dtype: what a checkpoint can be read in (`train.model.read_dtype`).
READ_DTYPES = ("auto", "bfloat16", "float32")
# optim: AdamW as torch implements it (fused: one kernel per step, where torch has it for the
# device), and HF's names of bitsandbytes' AdamW -> (bits of its state, paged), where it imports.
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
BNB_ADAMW = {"adamw_bnb_8bit": (8, False), "adamw_8bit": (8, False), "paged_adamw_8bit": (8, True),
             "paged_adamw_32bit": (32, True)}
LIGER_NEEDS_GPU = ("use_liger_kernel: true, but this run has no GPU: Liger's kernels are Triton kernels "
                   "for CUDA GPUs; set use_liger_kernel: false")


def _check_reference_choices(cfg: TrainConfig) -> None:
    """The reference's keys whose values this machine or simpo-ray cannot honour: one line each."""
    if cfg.torch_dtype is not None and cfg.torch_dtype not in READ_DTYPES:
        why = ("is not supported: training reads the checkpoint into fp32 master weights and computes in "
               "bf16 or fp32, so reading it in float16 would only cut a bf16 checkpoint's range (above "
               "65504: inf)" if cfg.torch_dtype == "float16" else "is not allowed")
        raise ConfigError(f"torch_dtype: {cfg.torch_dtype!r} {why}; choose one of {', '.join(READ_DTYPES)} "
                          "or null (fp32)")
    if cfg.optim not in OPTIMIZERS and cfg.optim not in BNB_ADAMW:
        raise ConfigError(f"optim: {cfg.optim!r} is not supported: SimPO trains here with AdamW; choose one of "
                          f"{', '.join(OPTIMIZERS)}, or with bitsandbytes installed {', '.join(BNB_ADAMW)}")
    if cfg.use_liger_kernel and cfg.use_gpu is False:
        raise ConfigError(LIGER_NEEDS_GPU)


def check_packages(cfg: TrainConfig) -> None:
    """What a run of `cfg` needs installed here (called before a run starts, `launch.check_inputs`;
    not when a config is only read: a checkpoint trained with Liger exports on a CPU machine)."""
    if cfg.optim in BNB_ADAMW and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"optim: {cfg.optim!r} is bitsandbytes' AdamW, and bitsandbytes is not installed "
                          f"here (pip install bitsandbytes); or choose {' or '.join(OPTIMIZERS)}")
    if cfg.use_liger_kernel:
        missing = [m for m in ("liger_kernel", "triton") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"use_liger_kernel: true, but {' and '.join(missing)} cannot be imported here "
                              "(Liger's kernels are Triton kernels for CUDA GPUs: pip install liger-kernel); "
                              "set use_liger_kernel: false")


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
