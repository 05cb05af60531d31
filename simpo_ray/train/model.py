"""The policy model and its tokenizer, loaded through `AutoModelForCausalLM` / `AutoTokenizer`.

A model name is a Hub id, a local directory saved with ``save_pretrained``, or ``bundled:<size>``
(a tiny Llama of the bundled ladder, built on first use).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from simpo_ray.config import TrainConfig
from simpo_ray.data.hub import require_hub
from simpo_ray.errors import UserError, one_line

BUNDLED_PREFIX = "bundled:"


def resolve_model_path(name: str) -> str:
    """``bundled:<size>`` → the built model's directory; an existing local directory → itself;
    anything else is a Hub id left to transformers, after checking that the Hub answers (unless
    offline mode is on; `data.require_hub`). A path that looks local but is missing is an error."""
    if name.startswith(BUNDLED_PREFIX):
        from simpo_ray.bundled import models

        size = name[len(BUNDLED_PREFIX):]
        if size not in models.LADDER:
            raise UserError(f"unknown bundled model '{name}'; sizes: {', '.join(models.LADDER)}")
        return str(models.ensure_model(size))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise UserError(f"model path '{name}' is a file; expected a directory saved with save_pretrained")
    if name.startswith(("/", "./", "../", "~")):
        raise UserError(f"model path '{name}' does not exist")
    require_hub(f"model '{name}'")
    return name


def is_local(name: str) -> bool:
    """Whether a model name is local (``bundled:<size>`` or an existing directory), not a Hub id."""
    return name.startswith(BUNDLED_PREFIX) or Path(name).expanduser().is_dir()


def pretrained_kwargs(cfg: TrainConfig, name: str | None = None) -> dict:
    """``from_pretrained``'s keywords for `name` (default: the model): ``trust_remote_code``, and
    ``model_revision`` as ``revision=`` for a Hub id, as the reference passes it to the model's and
    the tokenizer's. A revision of a local model would select nothing: refused (but for "main",
    alignment-handbook's default, which its recipes set)."""
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.model_revision:
        # "main": alignment-handbook's recipes set it; a local copy is that revision as far as it goes
        if is_local(cfg.model_name_or_path) and cfg.model_revision != "main":
            raise UserError(f"model_revision: {cfg.model_revision!r} selects a revision of a Hub model, but "
                            f"model_name_or_path '{cfg.model_name_or_path}' is local; remove model_revision")
        if not is_local(name or cfg.model_name_or_path):
            kwargs["revision"] = cfg.model_revision
    return kwargs


def load_tokenizer(cfg: TrainConfig):
    """The tokenizer of ``tokenizer_name_or_path`` (default: the model's); pad token = EOS if
    unset; ``cfg.chat_template``, when given, replaces its chat template (as the reference's
    ``get_tokenizer`` does). Also checks ``max_length`` against the model's position limit
    (`check_position_limit`), so `launch.check_inputs` refuses it before Ray starts.

    Whether a chat template is needed depends on the data; `tokens.tokenize_split` checks that.
    """
    name = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **pretrained_kwargs(cfg, name))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer '{name}': {one_line(e, first=True)}") from None
    if tokenizer.eos_token is None:
        raise UserError(f"tokenizer '{name}' has no eos_token; SimPO responses must end with one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of loss and attention
    if cfg.chat_template is not None:
        tokenizer.chat_template = cfg.chat_template
    check_position_limit(cfg)
    return tokenizer


# Config attributes that hold a model's maximum sequence length, by architecture family.
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                       "n_ctx", "max_seq_len")


def position_limit(config) -> tuple[int, str] | None:
    """(limit, its key in the model's config.json) of a transformers model config, or None if it
    states none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in POSITION_LIMIT_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value, getattr(text, "attribute_map", {}).get(key, key)  # GPT-2: n_positions
    return None


def model_config(cfg: TrainConfig):
    """The model's transformers config (at ``model_revision``); `UserError` in one line if unreadable."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.model_name_or_path)
    try:
        return AutoConfig.from_pretrained(path, **pretrained_kwargs(cfg))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model '{cfg.model_name_or_path}': {one_line(e, first=True)}") from None


def model_position_limit(cfg: TrainConfig) -> tuple[int, str] | None:
    """The model's (position limit, its config key), for `config.load_train_config`'s default
    ``max_length``. A bundled model's is read from its architecture, without building it."""
    if cfg.model_name_or_path.startswith(BUNDLED_PREFIX):
        from simpo_ray.bundled import models

        size = cfg.model_name_or_path[len(BUNDLED_PREFIX):]
        if size in models.LADDER:
            return position_limit(models.shape_config(size))
    return position_limit(model_config(cfg))  # (an unknown bundled size: refused there, naming the sizes)


def check_position_limit(cfg: TrainConfig) -> None:
    """`UserError` when ``max_length`` exceeds the model's position limit (GPT-2's 1024 with the
    reference's ``max_length: 2048`` would fail inside a worker with an index error)."""
    found = position_limit(model_config(cfg))
    if found is not None and cfg.max_length > found[0]:
        raise UserError(
            f"max_length: {cfg.max_length} is above the position limit of model '{cfg.model_name_or_path}' "
            f"({found[1]}: {found[0]}); set max_length to at most {found[0]}"
        )


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 on ``device`` (CPU always; CUDA from Ampere on, without emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type in ("cpu", "xpu", "mps")


def read_dtype(cfg: TrainConfig, default: torch.dtype = torch.float32):
    """The dtype a checkpoint is read in (``from_pretrained``'s ``dtype``): ``torch_dtype``
    ("auto": as stored), else `default`."""
    return {"auto": "auto", "bfloat16": torch.bfloat16, "float32": torch.float32}.get(cfg.torch_dtype, default)


def export_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype an exported model is saved in: ``torch_dtype`` ("auto": the base checkpoint's
    stored dtype, fp32 if its config states none), else bf16 under ``bf16``, else fp32."""
    if cfg.torch_dtype == "auto":
        stored = getattr(model_config(cfg), "dtype", None)
        stored = getattr(torch, stored, None) if isinstance(stored, str) else stored
        return stored if isinstance(stored, torch.dtype) else torch.float32
    if cfg.torch_dtype:
        return getattr(torch, cfg.torch_dtype)
    return torch.bfloat16 if cfg.bf16 else torch.float32


def load_model(cfg: TrainConfig, device: str | torch.device | None = None, *, for_training: bool = True):
    """``AutoModelForCausalLM`` of ``model_name_or_path`` (at ``model_revision``) with
    ``attn_implementation``, ``trust_remote_code`` and gradient checkpointing (non-reentrant, KV
    cache off) from the config; moved to ``device`` when given.

    The checkpoint is read in ``torch_dtype`` (`read_dtype`). For training the weights are then
    fp32 whatever it was read in: the optimizer's master copy, as SimPO's ~5e-7 updates are far
    below bf16's resolution; the cast comes after the move, so only the read copy crosses to the
    device and a bf16 read halves each worker's CPU copy. ``cfg.bf16`` means bf16 *compute*: the
    training loop runs forward passes under ``torch.autocast(dtype=torch.bfloat16)``, as the
    reference trainer does; with ``for_training=False`` the weights are read in bf16 unless
    ``torch_dtype`` says otherwise.
    """
    device = torch.device(device) if device is not None else None
    if cfg.bf16 and not bf16_supported(device or torch.device("cpu")):
        raise UserError(
            f"bf16: true, but device {device} does not support bfloat16 (needs an Ampere or newer "
            "GPU); set bf16: false"
        )
    path = resolve_model_path(cfg.model_name_or_path)
    default = torch.bfloat16 if (cfg.bf16 and not for_training) else torch.float32
    kwargs = {"dtype": read_dtype(cfg, default), **pretrained_kwargs(cfg)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"cannot load model '{cfg.model_name_or_path}': {one_line(e, first=True)}") from None
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if device is not None:
        model.to(device)
    if for_training:
        model.float()
    return model


def apply_liger_kernel(model, device: torch.device) -> None:
    """``use_liger_kernel``: Liger Kernel's Triton kernels (RMSNorm, RoPE, SwiGLU) patched into
    `model`, as transformers' Trainer does (``_apply_liger_kernel_to_instance``). Its fused linear
    cross-entropy stays off: the SimPO step computes per-token log-probs from the hidden states
    itself (`train.logps`), never the causal LM's loss. Refused in one line where it cannot run
    (no CUDA device, liger_kernel not importable, a model type Liger does not patch)."""
    from simpo_ray.config import LIGER_NEEDS_GPU

    if torch.device(device).type != "cuda":
        raise UserError(LIGER_NEEDS_GPU)
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise UserError(f"use_liger_kernel: true, but liger_kernel cannot be imported ({one_line(e, first=True)}); "
                        "set use_liger_kernel: false") from None
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:  # Liger itself would only log it and go on
        raise UserError(f"use_liger_kernel: true, but Liger Kernel has no kernels for model type {model_type!r} "
                        f"(it has: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}); set use_liger_kernel: false")
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)


def disable_dropout(model) -> None:
    """Every dropout layer to p=0, as the reference trainer's `disable_dropout: true` does."""
    rates = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop",
             "attn_pdrop", "summary_first_dropout")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for key in rates:  # attention modules keep their rate as a float attribute
            if isinstance(getattr(module, key, None), float):
                setattr(module, key, 0.0)
    config = getattr(model, "config", None)
    for key in rates:
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def enable_checkpointing(model) -> None:
    """Non-reentrant activation (gradient) checkpointing, KV cache off (useless in training)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
