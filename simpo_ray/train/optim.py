"""A run's optimizer and warmup from its config, in HF TrainingArguments' names and defaults:
AdamW (`optim`: torch's, torch's fused kernel, or bitsandbytes'), `adam_beta1`, `adam_beta2`,
`adam_epsilon`, `weight_decay`, and `warmup_steps` (above 0) or else `warmup_ratio`.

The training loop and the memory trace build theirs here, so both run the optimizer configured.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from simpo_ray.config import BNB_ADAMW, TrainConfig
from simpo_ray.errors import UserError, one_line


def build_optimizer(cfg: TrainConfig, params: Iterable[torch.nn.Parameter], *,
                    foreach: bool | None = None) -> torch.optim.Optimizer:
    """The AdamW `cfg.optim` names over `params`. `foreach`: torch's multi-tensor implementation
    (None: torch's default for the device) for `adamw_torch`; `adamw_torch_fused` is refused in
    one line where torch has no fused kernel for the parameters' device or dtype."""
    params = list(params)
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                  weight_decay=cfg.weight_decay)
    if cfg.optim in BNB_ADAMW:
        return _bitsandbytes(cfg.optim, params, kwargs)
    if cfg.optim == "adamw_torch_fused":
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except RuntimeError as e:  # "`fused=True` requires all the params to be ... of supported devices"
            raise UserError(f"optim: 'adamw_torch_fused' is not available here ({one_line(e, first=True)}); "
                            "use adamw_torch") from None
    return torch.optim.AdamW(params, foreach=foreach, **kwargs)


def _bitsandbytes(name: str, params: list[torch.nn.Parameter], kwargs: dict) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW (`bitsandbytes.optim.AdamW`, as HF's Trainer builds it for these names)."""
    if any(hasattr(p, "to_local") for p in params):
        raise UserError(f"optim: {name!r} (bitsandbytes) takes plain tensors, not FSDP's sharded parameters; "
                        "use parallel: ddp, or optim: adamw_torch")
    bits, paged = BNB_ADAMW[name]
    try:
        import bitsandbytes

        return bitsandbytes.optim.AdamW(params, optim_bits=bits, is_paged=paged, **kwargs)
    except (ImportError, RuntimeError, ValueError) as e:
        raise UserError(f"optim: {name!r}: bitsandbytes cannot build it here: {one_line(e, first=True)}; "
                        "use adamw_torch") from None


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """HF's rule: `warmup_steps` when above 0, else ceil(warmup_ratio x the run's optimizer steps)."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)
