"""Lookups over the guide's tables (`simpo_ray.guide.tables`): the ranges and defaults a search
space is validated against, and `python -m simpo_ray.guide` to print the tables.

Two kinds of range per parameter:

- *documented range* (`documented_range`): the envelope a search space may cover without
  `--allow-out-of-range`. It is the widest range the guide still calls usable for the bucket.
- *recommended range* (`recommended_range`): the guide's "optimal"/"standard" rows, narrower;
  shown beside the searched range by `describe()` and `format_table()`.

Presets (`task`, `model_type`) narrow or shift both, as the guide's "By task type" and "By
model type" tables do; see `documented_range` for the rules.
"""

from __future__ import annotations

import re

from simpo_ray.errors import ConfigError, closest
from simpo_ray.guide.tables import (  # noqa: F401  (the tables are part of this module's API)
    BETA_BY_STRENGTH, BETA_DEFAULT, BETA_DOCUMENTED, BETA_OPTIMAL, BETA_RECOMMENDED, BUCKET_ORDER,
    BUCKETS, CPU_LR_DEFAULT, CPU_LR_RANGE, GAMMA_BY_STRENGTH, GAMMA_DEFAULT, GAMMA_DOCUMENTED,
    GAMMA_OPTIMAL, GENERAL_CHAT_LR, LR_7B_USABLE, LR_ROW_NOTES, LR_ROWS, MODEL_TYPES,
    MODEL_TYPES_TABLE, PARAMS, REASONING_EXAMPLE, REASONING_TASKS, REFERENCE_SETTINGS, SFT_DEFAULT,
    SFT_DOCUMENTED, SFT_RECOMMENDED, TASKS, TASKS_TABLE, ModelTypePreset, Range, ReferenceSetting,
    SizeBucket, StandardConfig, TaskPreset, round_sig, span,
)


# ---------------------------------------------------------------------------------------------
# Lookups
# ---------------------------------------------------------------------------------------------


def reference_settings(model_name_or_path: str) -> list[ReferenceSetting]:
    """The reference implementation's published settings for this model family, if any."""
    return [r for r in REFERENCE_SETTINGS if re.search(r.pattern, model_name_or_path, re.IGNORECASE)]


def bucket(name: str) -> SizeBucket:
    """The size bucket called `name` (`1b-3b`, `7b-8b`, `8b-13b`, `13b-30b`, `70b+`, `cpu`)."""
    if name not in BUCKETS:
        # '7b' should point at '7b-8b', not at its closest spelling '70b+'.
        prefixed = [b for b in BUCKETS if b.startswith(str(name).lower() + "-")]
        hint = f" (did you mean '{prefixed[0]}'?)" if prefixed else closest(str(name), BUCKETS)
        raise ConfigError(f"size_bucket: unknown bucket {name!r}{hint}; "
                          f"choose one of {', '.join(BUCKETS)}")
    return BUCKETS[name]


def task_preset(name: str | None) -> TaskPreset | None:
    if name is None:
        return None
    if name not in TASKS_TABLE:
        raise ConfigError(f"task: unknown task {name!r}{closest(str(name), TASKS_TABLE)}; "
                          f"choose one of {', '.join(TASKS)} (or null for none)")
    return TASKS_TABLE[name]


def model_type_preset(name: str | None) -> ModelTypePreset | None:
    if name is None:
        return None
    if name not in MODEL_TYPES_TABLE:
        raise ConfigError(f"model_type: unknown model type {name!r}"
                          f"{closest(str(name), MODEL_TYPES_TABLE)}; "
                          f"choose one of {', '.join(MODEL_TYPES)} (or null for none)")
    return MODEL_TYPES_TABLE[name]


def _check_param(param: str) -> None:
    if param not in PARAMS:
        raise ConfigError(f"unknown parameter {param!r}{closest(param, PARAMS)}; "
                          f"the guide documents {', '.join(PARAMS)}")


def _task_lr(rng: Range, b: SizeBucket, task: str | None) -> Range:
    t = task_preset(task)
    if t is None:
        return rng
    return rng.scaled(t.lr_factor).intersect(b.learning_rate_envelope)


def documented_range(param: str, bucket_name: str, task: str | None = None,
                     model_type: str | None = None) -> tuple[float, float]:
    """The range a search space may cover for `param` (validation envelope).

    - learning_rate: the bucket's envelope; a task multiplies it by the task's rate over the
      general-chat rate (code/math x0.6, creative x2) and intersects it with the envelope.
      7b-8b: chat [1e-7, 1e-6], code/math [1e-7, 6e-7], creative [2e-7, 1e-6].
    - beta: [1.0, 10.0]; gamma_beta_ratio: [0.0, 1.0] (no preset moves them).
    - sft_weight: [0.0, 1.0]; model type base [0, 0.05], instruct [0.05, 0.1], chat [0.1, 0.2].
    """
    _check_param(param)
    b = bucket(bucket_name)
    if param == "learning_rate":
        return _task_lr(b.learning_rate_envelope, b, task).as_tuple()
    if param == "beta":
        return BETA_DOCUMENTED.as_tuple()
    if param == "gamma_beta_ratio":
        return GAMMA_DOCUMENTED.as_tuple()
    m = model_type_preset(model_type)
    return (m.sft_weight if m else SFT_DOCUMENTED).as_tuple()


def recommended_range(param: str, bucket_name: str, task: str | None = None,
                      model_type: str | None = None) -> tuple[float, float]:
    """The guide's narrower "optimal"/"standard" range (shown beside the searched range)."""
    _check_param(param)
    b = bucket(bucket_name)
    if param == "learning_rate":
        return _task_lr(b.learning_rate, b, task).as_tuple()
    if param == "beta":
        return BETA_OPTIMAL.as_tuple()
    if param == "gamma_beta_ratio":
        return GAMMA_OPTIMAL.as_tuple()
    m = model_type_preset(model_type)
    return (m.sft_recommended if m else SFT_RECOMMENDED).as_tuple()


def documented_default(bucket_name: str, model_type: str | None = None,
                       task: str | None = None) -> dict[str, float]:
    """The guide's starting point for the four parameters under this bucket and preset.

    The bucket's standard config, with the learning rate scaled by the task (7b-8b: chat 5e-7,
    code/math 3e-7, creative 1e-6, exactly the guide's "By task type" rates) and kept inside
    the bucket's envelope, and sft_weight for the model type.
    """
    b = bucket(bucket_name)
    t = task_preset(task)
    model_type_preset(model_type)  # validates the name
    s = b.standard
    lr = s.learning_rate
    if t is not None:
        lr = b.learning_rate_envelope.clip(round_sig(lr * t.lr_factor))
    return {"learning_rate": lr, "beta": s.beta, "gamma_beta_ratio": s.gamma_beta_ratio,
            "sft_weight": s.sft_weight[model_type]}


def effective_batch_range(bucket_name: str) -> tuple[int, int] | None:
    eb = bucket(bucket_name).effective_batch
    return None if eb is None else (int(eb.low), int(eb.high))


def summary(bucket_name: str, task: str | None = None, model_type: str | None = None) -> dict:
    """Documented and recommended ranges and defaults as plain data (for search.json)."""
    return {
        "size_bucket": bucket_name, "task": task, "model_type": model_type,
        "defaults": documented_default(bucket_name, model_type, task),
        "documented_ranges": {p: list(documented_range(p, bucket_name, task, model_type)) for p in PARAMS},
        "recommended_ranges": {p: list(recommended_range(p, bucket_name, task, model_type)) for p in PARAMS},
        "effective_batch": (list(effective_batch_range(bucket_name))
                            if effective_batch_range(bucket_name) else None),
    }


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_range(x: Range | tuple[float, float] | None) -> str:
    if x is None:
        return "-"
    lo, hi = x.as_tuple() if isinstance(x, Range) else x
    return f"{lo:g}" if lo == hi else f"{lo:g} to {hi:g}"


def format_table() -> str:
    """The guide's tables, as this module encodes them, for comparing with the guide by eye."""
    out = ["Learning rate by model size (guide: 'By model size'; usable envelope: see notes)"]
    out.append(text_table(
        ["bucket", "recommended lr", "documented envelope", "effective batch", "notes"],
        [[b.name, format_range(b.learning_rate), format_range(b.learning_rate_envelope),
          format_range(b.effective_batch),
          "; ".join((*(LR_ROW_NOTES[r] for r in b.rows[:1] if len(b.rows) == 1), *b.notes))]
         for b in BUCKETS.values()]))
    out.append("\nStandard configs (guide: 'Model-Size-Specific Recommendations')")
    out.append(text_table(
        ["bucket", "learning_rate", "beta", "gamma_beta_ratio", "sft_weight (none/base/instruct/chat)",
         "batch x accum", "source"],
        [[b.name, f"{s.learning_rate:g}", f"{s.beta:g}", f"{s.gamma_beta_ratio:g}",
          "/".join(f"{s.sft_weight[k]:g}" for k in (None, *MODEL_TYPES)),
          f"{s.per_device_train_batch_size} x {s.gradient_accumulation_steps}"
          if s.per_device_train_batch_size else "-", s.source]
         for b in BUCKETS.values() for s in [b.standard]]))
    out.append("\nLearning rate by task (guide: 'By task type'; scaled by lr/5e-7 for other sizes)")
    out.append(text_table(["task", "guide label", "learning_rate", "reason", "7b-8b documented range"],
                      [[t.name, t.guide_label, f"{t.learning_rate:g}", t.reason,
                        format_range(documented_range("learning_rate", "7b-8b", t.name))]
                       for t in TASKS_TABLE.values()]))
    out.append("\nBeta (guide: range 2.0 to 10.0, default 2.0 to 2.5, optimal 2.0-5.0; "
               f"documented for validation {BETA_DOCUMENTED})")
    out.append(text_table(["preference strength", "beta", "gamma_beta_ratio"],
                      [[k, format_range(BETA_BY_STRENGTH[k]), format_range(GAMMA_BY_STRENGTH[k])]
                       for k in BETA_BY_STRENGTH]))
    out.append(f"\nGamma-beta ratio: range {GAMMA_DOCUMENTED}, default {GAMMA_DEFAULT:g}, "
               f"optimal {GAMMA_OPTIMAL}")
    out.append(f"\nSFT weight by model type (guide: range {SFT_DOCUMENTED}, default {SFT_DEFAULT:g})")
    out.append(text_table(["model type", "guide row", "documented range", "default", "source"],
                      [[m.name, format_range(m.sft_recommended), str(m.sft_weight), f"{m.sft_default:g}",
                        m.source]
                       for m in MODEL_TYPES_TABLE.values()]))
    out.append("\nSimPO reference settings (princeton-nlp/SimPO)")
    out.append(text_table(["setting", "learning_rate", "beta", "gamma_beta_ratio", "sft_weight", "source"],
                      [[r.name, f"{r.learning_rate:g}", f"{r.beta:g}", f"{r.gamma_beta_ratio:g}",
                        f"{r.sft_weight:g}", r.source.rsplit("/", 1)[-1]] for r in REFERENCE_SETTINGS]))
    return "\n".join(out)
