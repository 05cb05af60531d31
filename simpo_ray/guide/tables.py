"""The SimPO hyperparameter guide's tables as data: size buckets, learning-rate rows, standard
configs, beta/gamma/sft ranges, task and model-type presets, the reference's published settings.

Source: the project's domain specification, `shared/reference/simpo-hyperparameters.md` beside
the repository ("the guide"). Every number below names the guide section it comes from; numbers
the guide does not give are marked EXTRAPOLATED with the rule used, and the CPU bucket is marked
as the project's own. Lookups over these tables are in `simpo_ray.guide`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PARAMS = ("learning_rate", "beta", "gamma_beta_ratio", "sft_weight")
TASKS = ("chat", "code", "math", "creative")
MODEL_TYPES = ("base", "instruct", "chat")


@dataclass(frozen=True)
class Range:
    low: float
    high: float

    def __contains__(self, x: float) -> bool:
        # Relative tolerance: 3e-7 * 0.6 / 0.6 must still count as inside [1.8e-7, 3e-7].
        tol = 1e-9 * max(abs(self.low), abs(self.high), 1e-300)
        return self.low - tol <= x <= self.high + tol

    def clip(self, x: float) -> float:
        return min(max(x, self.low), self.high)

    def intersect(self, other: Range) -> Range:
        low, high = max(self.low, other.low), min(self.high, other.high)
        if low > high:  # disjoint: collapse onto the nearer end of `other`
            return Range(other.clip(low), other.clip(low))
        return Range(low, high)

    def scaled(self, factor: float) -> Range:
        return Range(round_sig(self.low * factor), round_sig(self.high * factor))

    def as_tuple(self) -> tuple[float, float]:
        return (self.low, self.high)

    def __str__(self) -> str:
        return f"[{self.low:g}, {self.high:g}]"


def span(*ranges: Range) -> Range:
    return Range(min(r.low for r in ranges), max(r.high for r in ranges))


def round_sig(x: float, digits: int = 6) -> float:
    """Drop float noise from products like 5e-7 * 0.6 (-> 3e-7, not 2.9999999999999997e-07)."""
    return 0.0 if x == 0 else round(x, digits - 1 - math.floor(math.log10(abs(x))))


# ---------------------------------------------------------------------------------------------
# Learning rate by model size
# ---------------------------------------------------------------------------------------------

# "Learning Rate > By model size" table, the guide's own four rows, in table order.
LR_ROWS: dict[str, Range] = {
    "1B-3B": Range(5e-7, 1e-6),     # "Higher end safe"
    "7B-8B": Range(3e-7, 5e-7),     # "Standard"
    "13B-30B": Range(1e-7, 3e-7),   # "Lower for stability"
    "70B+": Range(5e-8, 1e-7),      # "Very conservative"
}
LR_ROW_NOTES = {"1B-3B": "Higher end safe", "7B-8B": "Standard",
                "13B-30B": "Lower for stability", "70B+": "Very conservative"}

# "Why Learning Rate Matters": too high > 1e-6 for 7B, too low < 1e-7 for 7B, optimal
# 3e-7 to 5e-7. The only bucket for which the guide states usable bounds beyond the table row.
LR_7B_USABLE = Range(1e-7, 1e-6)

# The project's own measured range for the bundled CPU task's tiny models (0.1M-5M params,
# random init then a short SFT). NOT from the guide: such models need rates 2-4 orders of
# magnitude above the guide's. Measured on the bundled sort task (AdamW, batch 16, cosine):
# 1e-5 barely moves either metric, 1e-3 to 3e-3 raises success rate and preference accuracy
# (with sft_weight > 0), 1e-2 collapses generation. The range spans "too low" to "too high".
CPU_LR_RANGE = Range(1e-4, 1e-2)
CPU_LR_DEFAULT = 1e-3  # the measured sweet spot for bundled:tiny


def _lr_envelope(rows: tuple[str, ...]) -> Range:
    """The span of the given guide rows and their immediate neighbours in the size table.

    For 7B-8B this gives [1e-7, 1e-6] (neighbours 13B-30B and 1B-3B), exactly the usable
    bounds the guide states for 7B in "Why Learning Rate Matters"; for every other bucket the
    same rule is EXTRAPOLATED (the guide states no bounds beyond the row).
    """
    order = list(LR_ROWS)
    idx = {order.index(r) for r in rows}
    idx |= {i + d for i in idx for d in (-1, 1) if 0 <= i + d < len(order)}
    return span(*(LR_ROWS[order[i]] for i in sorted(idx)))


# ---------------------------------------------------------------------------------------------
# Size buckets and their standard configs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StandardConfig:
    """A bucket's documented starting point ("Model-Size-Specific Recommendations")."""

    learning_rate: float
    beta: float
    gamma_beta_ratio: float
    # sft_weight per model type; key None = no model type given (the value as the guide
    # writes it without a condition).
    sft_weight: dict[str | None, float]
    per_device_train_batch_size: int | None
    gradient_accumulation_steps: int | None
    source: str


@dataclass(frozen=True)
class SizeBucket:
    name: str
    label: str                          # how the guide (or this project) names it
    rows: tuple[str, ...]               # the "By model size" rows it covers
    learning_rate: Range                # recommended (table row(s))
    learning_rate_envelope: Range       # documented: what a search space may cover
    standard: StandardConfig
    effective_batch: Range | None       # "Recommended effective batch sizes"
    notes: tuple[str, ...] = field(default=())


_SFT_BY_TYPE_7B = {None: 0.0, "base": 0.0, "instruct": 0.1, "chat": 0.2}

BUCKETS: dict[str, SizeBucket] = {
    "1b-3b": SizeBucket(
        name="1b-3b", label="1B-3B", rows=("1B-3B",),
        learning_rate=LR_ROWS["1B-3B"],                 # "By model size": 5e-7 to 1e-6
        learning_rate_envelope=_lr_envelope(("1B-3B",)),  # EXTRAPOLATED: [3e-7, 1e-6]
        standard=StandardConfig(
            # EXTRAPOLATED: the guide has no 1B-3B standard config. lr 5e-7 is the "Tuning
            # Guide > Step 1" default and the "General chat" rate, and lies in the 1B-3B row;
            # beta/gamma/sft/batch are the 7B standard config's.
            learning_rate=5e-7, beta=2.0, gamma_beta_ratio=0.5, sft_weight=_SFT_BY_TYPE_7B,
            per_device_train_batch_size=2, gradient_accumulation_steps=4,
            source="extrapolated from the 7B standard config and 'Tuning Guide > Step 1'"),
        # EXTRAPOLATED: the guide lists 7B/13B/70B only; a 1B-3B model gets the 7B row, the
        # smallest model it lists (smaller models take at least as large batches).
        effective_batch=Range(128, 256),
        notes=("standard config and effective batch extrapolated (the guide lists none)",),
    ),
    "7b-8b": SizeBucket(
        name="7b-8b", label="7B-8B", rows=("7B-8B",),
        learning_rate=LR_ROWS["7B-8B"],                 # "By model size": 3e-7 to 5e-7
        learning_rate_envelope=LR_7B_USABLE,            # "Why Learning Rate Matters"
        standard=StandardConfig(
            # "Model-Size-Specific Recommendations > 7B Models (Mistral, Llama 3)":
            # sft_weight "0.0  # 0.1 if instruct"; chat 0.2 from "SFT Weight > Config
            # Examples > Chat model (moderate SFT)".
            learning_rate=5e-7, beta=2.0, gamma_beta_ratio=0.5, sft_weight=_SFT_BY_TYPE_7B,
            per_device_train_batch_size=2, gradient_accumulation_steps=4,
            source="guide: 7B Models (Mistral, Llama 3) standard config"),
        effective_batch=Range(128, 256),                # "Recommended effective batch sizes: 7B"
    ),
    "8b-13b": SizeBucket(
        name="8b-13b", label="8B-13B", rows=("7B-8B", "13B-30B"),
        # The guide's size table has no 8B-13B row, but a "8B-13B Models" standard config (lr
        # 3e-7). An 8B model sits in the 7B-8B row, a 13B model in the 13B-30B row, so the
        # bucket's recommended range is the span of both rows, [1e-7, 5e-7]; the standard
        # config's 3e-7 is exactly where the two rows meet.
        learning_rate=span(LR_ROWS["7B-8B"], LR_ROWS["13B-30B"]),
        # Envelope: the union of the two rows' envelopes, [5e-8, 1e-6] (the 8B end may go as
        # high as the guide allows a 7B-8B model, the 13B end as low as a 13B-30B model).
        learning_rate_envelope=_lr_envelope(("7B-8B", "13B-30B")),
        standard=StandardConfig(
            # "Model-Size-Specific Recommendations > 8B-13B Models": sft_weight "0.1  # If
            # instruct", so 0.0 without that condition; chat 0.2 as for 7B.
            learning_rate=3e-7, beta=2.5, gamma_beta_ratio=0.5,
            sft_weight={None: 0.0, "base": 0.0, "instruct": 0.1, "chat": 0.2},
            per_device_train_batch_size=1, gradient_accumulation_steps=8,
            source="guide: 8B-13B Models standard config"),
        effective_batch=Range(64, 128),                 # "Recommended effective batch sizes: 13B"
        notes=("lr range: span of the guide's 7B-8B and 13B-30B rows",),
    ),
    "13b-30b": SizeBucket(
        name="13b-30b", label="13B-30B", rows=("13B-30B",),
        learning_rate=LR_ROWS["13B-30B"],               # "By model size": 1e-7 to 3e-7
        learning_rate_envelope=_lr_envelope(("13B-30B",)),  # EXTRAPOLATED: [5e-8, 5e-7]
        standard=StandardConfig(
            # EXTRAPOLATED: no 13B-30B standard config in the guide. lr 2e-7 is the row's
            # (rounded) geometric middle, between the 8B-13B (3e-7) and 70B (1e-7) standard
            # configs; beta 2.0 ("Default: 2.0 to 2.5", also the 70B config); sft and batch as
            # the 8B-13B config.
            learning_rate=2e-7, beta=2.0, gamma_beta_ratio=0.5,
            sft_weight={None: 0.0, "base": 0.0, "instruct": 0.1, "chat": 0.2},
            per_device_train_batch_size=1, gradient_accumulation_steps=8,
            source="extrapolated between the 8B-13B and 70B standard configs"),
        effective_batch=Range(64, 128),                 # "Recommended effective batch sizes: 13B"
        notes=("standard config extrapolated (the guide lists none)",),
    ),
    "70b+": SizeBucket(
        name="70b+", label="70B+", rows=("70B+",),
        learning_rate=LR_ROWS["70B+"],                  # "By model size": 5e-8 to 1e-7
        learning_rate_envelope=_lr_envelope(("70B+",)),  # EXTRAPOLATED: [5e-8, 3e-7]
        standard=StandardConfig(
            # "Model-Size-Specific Recommendations > 70B Models": sft_weight 0.05 without a
            # condition. It lies in the base (see SFT_BY_MODEL_TYPE) and instruct ranges; for a
            # chat model it is raised to the chat row's low end, 0.1 (EXTRAPOLATED).
            learning_rate=1e-7, beta=2.0, gamma_beta_ratio=0.5,
            sft_weight={None: 0.05, "base": 0.05, "instruct": 0.05, "chat": 0.1},
            per_device_train_batch_size=1, gradient_accumulation_steps=16,
            source="guide: 70B Models standard config"),
        effective_batch=Range(32, 64),                  # "Recommended effective batch sizes: 70B"
    ),
    "cpu": SizeBucket(
        name="cpu", label="CPU (bundled 0.1M-5M)", rows=(),
        # NOT from the guide: the project's own measured range, see CPU_LR_RANGE.
        learning_rate=CPU_LR_RANGE, learning_rate_envelope=CPU_LR_RANGE,
        standard=StandardConfig(
            # lr: project's own (measured on the bundled task); beta/gamma/sft: the guide's general defaults
            # ("Beta > Default", "Gamma-Beta Ratio > Default", "SFT Weight > Default").
            learning_rate=CPU_LR_DEFAULT, beta=2.0, gamma_beta_ratio=0.5,
            sft_weight=_SFT_BY_TYPE_7B,
            per_device_train_batch_size=None, gradient_accumulation_steps=None,
            source="project's own CPU range (measured on the bundled task) + the guide's general defaults"),
        effective_batch=None,
        notes=("learning rate NOT from the guide: CPU_LR_RANGE, measured on the bundled task",),
    ),
}
BUCKET_ORDER = tuple(BUCKETS)

# ---------------------------------------------------------------------------------------------
# Beta, gamma_beta_ratio, sft_weight
# ---------------------------------------------------------------------------------------------

# "Beta (β)": "Range: 2.0 to 10.0", but the same section's preference-strength table has a
# 1.0-2.0 "Weak" row ("Subtle preferences"), and "Tuning Guide > Step 3 > If loss diverges"
# prescribes beta 1.0. Validation therefore accepts [1.0, 10.0]: rejecting a value the guide
# itself prescribes would be wrong. [2.0, 10.0] is the recommended range shown beside it.
BETA_DOCUMENTED = Range(1.0, 10.0)
BETA_RECOMMENDED = Range(2.0, 10.0)   # "Range: 2.0 to 10.0"
BETA_OPTIMAL = Range(2.0, 5.0)        # "Optimal (2.0-5.0)"
BETA_DEFAULT = Range(2.0, 2.5)        # "Default: 2.0 to 2.5"
# "Beta > By preference strength"
BETA_BY_STRENGTH = {"weak": Range(1.0, 2.0), "standard": Range(2.0, 5.0), "strong": Range(5.0, 10.0)}

# "Gamma-Beta Ratio (γ/β)": "Range: 0.0 to 1.0", "Default: 0.5", "Optimal (0.4-0.6)".
GAMMA_DOCUMENTED = Range(0.0, 1.0)
GAMMA_OPTIMAL = Range(0.4, 0.6)
GAMMA_DEFAULT = 0.5
# "Gamma-Beta Ratio > By scenario"
GAMMA_BY_STRENGTH = {"weak": Range(0.0, 0.3), "standard": Range(0.4, 0.6), "strong": Range(0.7, 1.0)}

# "SFT Weight": "Range: 0.0 to 1.0", "Default: 0.0"; "High SFT (> 0.2) ... may reduce
# alignment gains", so 0.2 tops the recommended range when no model type is given.
SFT_DOCUMENTED = Range(0.0, 1.0)
SFT_RECOMMENDED = Range(0.0, 0.2)
SFT_DEFAULT = 0.0


@dataclass(frozen=True)
class ModelTypePreset:
    name: str
    sft_weight: Range          # documented range under this preset
    sft_recommended: Range     # the guide's row
    sft_default: float
    source: str


# "SFT Weight > By model type". The guide gives base models the single value 0.0 ("No prior
# capabilities"). A searched range must not be empty, so base allows [0.0, 0.05]: 0.05 is the
# guide's smallest non-zero recommendation (bottom of the instruct row, and the 70B standard
# config's unconditional value), so the range holds only values the guide itself uses. To run
# pure SimPO on a base model, fix `sft_weight: 0.0` in the space's `base` instead.
MODEL_TYPES_TABLE: dict[str, ModelTypePreset] = {
    "base": ModelTypePreset("base", Range(0.0, 0.05), Range(0.0, 0.0), 0.0,
                            "Base model 0.0 'No prior capabilities'"),
    "instruct": ModelTypePreset("instruct", Range(0.05, 0.1), Range(0.05, 0.1), 0.1,
                                "Instruct model 0.05-0.1 'Preserve instruction following'; "
                                "default 0.1 ('Instruct model (light SFT)')"),
    "chat": ModelTypePreset("chat", Range(0.1, 0.2), Range(0.1, 0.2), 0.2,
                            "Chat model 0.1-0.2 'Preserve conversational skills'; "
                            "default 0.2 ('Chat model (moderate SFT)')"),
}

# ---------------------------------------------------------------------------------------------
# Task presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskPreset:
    name: str
    learning_rate: float   # the guide's value ("By task type"), a 7B-scale rate
    reason: str
    guide_label: str

    @property
    def lr_factor(self) -> float:
        """The task's rate relative to the 7B standard (5e-7 = "General chat")."""
        return self.learning_rate / GENERAL_CHAT_LR


GENERAL_CHAT_LR = 5e-7
# "Learning Rate > By task type". The guide gives one rate per task, no model size; its config
# examples pair them with 7B-9B models (Mistral 7B general 5e-7, Llama 3 8B reasoning 3e-7,
# Gemma 2 9B creative 1e-6), so they are read as 7B-scale rates. For other sizes the task's
# ratio to the general-chat rate is applied to the bucket's ranges (EXTRAPOLATED), then
# intersected with the bucket's envelope, so a task never leaves its size envelope.
TASKS_TABLE: dict[str, TaskPreset] = {
    "chat": TaskPreset("chat", 5e-7, "Standard", "General chat"),
    "code": TaskPreset("code", 3e-7, "Precise reasoning", "Code generation"),
    "math": TaskPreset("math", 3e-7, "Careful optimization", "Math reasoning"),
    "creative": TaskPreset("creative", 1e-6, "More aggressive OK", "Creative writing"),
}
# The guide ties beta and gamma_beta_ratio to the *data's* preference strength, never to the
# task, so task presets do not move their ranges. Its one reasoning example ("Complete Example
# Configs > Llama 3 8B Instruct (Reasoning)": lr 3e-7, beta 5.0, gamma_beta_ratio 0.7, sft
# 0.1) is added as an extra starting point for the reasoning tasks (code's reason is "Precise
# reasoning") rather than as a range shift.
REASONING_EXAMPLE = {"learning_rate": 3e-7, "beta": 5.0, "gamma_beta_ratio": 0.7, "sft_weight": 0.1}
REASONING_TASKS = ("code", "math")

# ---------------------------------------------------------------------------------------------
# Published settings of the SimPO reference implementation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceSetting:
    name: str
    pattern: str           # regex matched (case-insensitive) against model_name_or_path
    learning_rate: float
    beta: float
    gamma_beta_ratio: float
    sft_weight: float
    source: str

    def params(self) -> dict[str, float]:
        return {p: getattr(self, p) for p in PARAMS}


_SIMPO = "princeton-nlp/SimPO README 'Tips for Running SimPO' + training_configs/"
# Patterns cover the upstream names and the reference's own SFT checkpoints
# (princeton-nlp/Mistral-7B-Base-SFT, princeton-nlp/Llama-3-Base-8B-SFT). sft_weight is 0 in
# all of them (the reference trainer has no SFT term in these configs).
REFERENCE_SETTINGS: tuple[ReferenceSetting, ...] = (
    # Mistral-Base started from alignment-handbook/zephyr-7b-sft-full (the reference's SFT model).
    ReferenceSetting("Mistral-Base", r"mistral-7b(?!-instruct)|zephyr-7b-sft", 3e-7, 2.0, 0.8, 0.0,
                     _SIMPO + "mistral-7b-base-simpo.yaml"),
    ReferenceSetting("Mistral-Instruct", r"mistral-7b-instruct", 5e-7, 2.5, 0.1, 0.0,
                     _SIMPO + "mistral-7b-instruct-simpo.yaml"),
    ReferenceSetting("Llama3-Base", r"llama-3-(8b(?!-instruct)|base-8b)", 6e-7, 2.0, 0.5, 0.0,
                     _SIMPO + "llama-3-8b-base-simpo.yaml"),
    ReferenceSetting("Llama3-Instruct", r"llama-3-(8b-instruct|instruct-8b)", 1e-6, 2.5, 0.55, 0.0,
                     _SIMPO + "llama-3-8b-instruct-simpo.yaml"),
    ReferenceSetting("Llama3-Instruct v0.2", r"llama-3-(8b-instruct|instruct-8b)", 1e-6, 10.0, 0.3, 0.0,
                     _SIMPO + "llama-3-8b-instruct-simpo-v2.yaml"),
    ReferenceSetting("Gemma2-9B-it", r"gemma-2-9b-it", 8e-7, 10.0, 0.5, 0.0,
                     _SIMPO + "gemma-2-9b-it-simpo.yaml"),
)
