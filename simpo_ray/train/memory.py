"""The memory planner: per-GPU bytes of one SimPO training worker under DDP or FSDP.

Counts weights, gradients and AdamW state (fp32 master weights, as the trainer keeps them), the
FSDP all-gather buffers, and activations of the concatenated chosen+rejected forward, from the
model's config and the batch shape. Method and measured error: docs/design.md ("Memory plan"); on a GPU: docs/benchmarks.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GB = 1e9
# CUDA context, NCCL buffers and allocator fragmentation: not in the model's bytes.
GPU_OVERHEAD_BYTES = 2.0 * GB
# The plan must leave this share of a GPU free (allocator slack, eval, spikes).
FIT_MARGIN = 0.9

@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a decoder-only transformer."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_dim: int
    tied: bool
    source: str                      # where the numbers come from, for the plan's text
    params: float = field(default=0.0)  # 0: computed from the shape

    @property
    def embedding_params(self) -> float:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def layer_params(self) -> float:
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate + 2 * h

    @property
    def total_params(self) -> float:
        return self.params or (self.embedding_params + self.layers * self.layer_params + self.hidden)

    @classmethod
    def from_config(cls, config: Any, source: str) -> ModelShape:
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        h = int(c.hidden_size)
        heads = int(getattr(c, "num_attention_heads", 1))
        kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(c, "head_dim", None) or h // heads)
        return cls(layers=int(c.num_hidden_layers), hidden=h,
                   intermediate=int(getattr(c, "intermediate_size", None) or 4 * h),
                   vocab=int(c.vocab_size), kv_dim=kv_heads * head_dim,
                   tied=bool(getattr(c, "tie_word_embeddings", False)), source=source)


@dataclass(frozen=True)
class Batch:
    micro_batch: int          # per_device_train_batch_size: pairs per forward
    seq_len: int              # max_length (the padded worst case)
    bf16: bool
    gradient_checkpointing: bool


# The moments of a step that can be its peak, and the transient parts each holds (the other
# parts are held throughout).
MOMENTS = {
    "forward/backward": ("gather_buffers", "activations", "logps_chunk"),
    "end of the backward": ("head_gradients",),   # the embedding's and head's gradients
    "optimizer step": ("optimizer_step",),         # foreach AdamW's temporaries
}
TRANSIENT = tuple(k for parts in MOMENTS.values() for k in parts)


@dataclass(frozen=True)
class MemoryPlan:
    strategy: str             # ddp | fsdp
    world: int                # workers the state is sharded over (1 for DDP)
    cpu_offload: bool
    parts: dict[str, float]   # bytes per GPU by part
    shape: ModelShape

    @property
    def peak_moment(self) -> str:
        return max(MOMENTS, key=lambda m: sum(self.parts[k] for k in MOMENTS[m]))

    @property
    def total(self) -> float:
        """The resident parts, plus the transient parts of the moment that holds the most."""
        p = self.parts
        resident = sum(v for k, v in p.items() if k not in TRANSIENT)
        return resident + sum(p[k] for k in MOMENTS[self.peak_moment])

    @property
    def state(self) -> float:
        return self.parts["weights"] + self.parts["grads"] + self.parts["optimizer"]

    def fits(self, gpu_memory_gb: float) -> bool:
        return self.total <= FIT_MARGIN * gpu_memory_gb * GB

    def summary(self) -> str:
        p = self.parts
        shard = f" over {self.world} workers" if self.strategy == "fsdp" else ""
        off = ", params+optimizer offloaded to CPU" if self.cpu_offload else ""
        where = self.peak_moment
        buffers = "all-gather and reduce-scatter buffers" if self.strategy == "fsdp" else "bf16 weight copies"
        return (f"parallel={self.strategy}{shard}{off}: ~{self.total / GB:.1f} GB per GPU, peak in the {where} "
                f"(weights+grads+AdamW {self.state / GB:.1f} GB; forward/backward: {buffers} "
                f"{p['gather_buffers'] / GB:.1f} GB, activations {p['activations'] / GB:.1f} GB, "
                f"log-prob chunk {p['logps_chunk'] / GB:.2f} GB; "
                + (f"end of the backward: embedding and head gradients {p['head_gradients'] / GB:.1f} GB; "
                   if p["head_gradients"] else "") + f"optimizer step temporaries "
                f"{p['optimizer_step'] / GB:.1f} GB; CUDA overhead {p['overhead'] / GB:.1f} GB"
                + (f"; reward model {p['reward_model'] / GB:.1f} GB" if p.get("reward_model") else "") + ")")


def activation_bytes(shape: ModelShape, batch: Batch, *, sharded_bf16: bool) -> tuple[float, float]:
    """(bytes kept for backward after the forward, extra peak while one layer is recomputed)
    for one micro-batch of 2 x micro_batch sequences (chosen and rejected, concatenated).

    Per token and layer, the tensors a Llama-style layer saves (sdpa attention, no [T, T]
    scores): norm outputs and residuals (4h), q/k/v (h + 2 kv), attention output (h),
    gate/up/act/product (4 i); outside the layers the embedding output and final norm (3h) and
    the log-prob chunk's fp32 input (h). With gradient checkpointing a layer keeps only its input,
    and one layer's full set exists again during its recompute. The residual stream is fp32
    under autocast over fp32 weights (DDP) and bf16 under FSDP's bf16 parameters.
    """
    tokens = 2 * batch.micro_batch * batch.seq_len
    act = 2 if batch.bf16 else 4
    resid = 2 if (batch.bf16 and sharded_bf16) else 4
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    per_layer_token = resid * 4 * h + act * (2 * h + 2 * kv + 4 * i)
    outside = tokens * (resid * 3 * h + 4 * h)
    if batch.gradient_checkpointing:
        return outside + tokens * shape.layers * resid * h, tokens * per_layer_token
    return outside + tokens * shape.layers * per_layer_token, 0.0


def plan(shape: ModelShape, batch: Batch, *, strategy: str, world: int,
         cpu_offload: bool = False, gpu: bool = True, reward_params: float = 0.0) -> MemoryPlan:
    """Per-worker bytes of one training step under `strategy` ('ddp' or 'fsdp') with `world` workers;
    `reward_params`: the reward model every worker keeps for generation-quality evaluation
    (unsharded, bf16 under `bf16`)."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
    n = shape.total_params
    shards = world if strategy == "fsdp" else 1
    on_device = 0.0 if (cpu_offload and strategy == "fsdp") else 1.0
    compute = 2 if batch.bf16 else 4
    # `torch_dtype` changes none of these parts: it is the dtype the checkpoint is READ in (a copy
    # in CPU memory, rank 0's alone under FSDP, gone before the first step; under DDP it crosses
    # to the GPU in that dtype and is cast there), and the weights trained are fp32 whatever it
    # says. A bitsandbytes `optim` keeps less AdamW state than the 8 bytes a parameter counted
    # here: the plan over-counts it, on the safe side.
    parts = {
        "weights": 4 * n / shards * on_device,
        "grads": 4 * n / shards * on_device,       # FSDP: reduce-scattered every micro-batch; DDP: bucket views
        "optimizer": 8 * n / shards * on_device,   # AdamW exp_avg + exp_avg_sq, fp32
        "gather_buffers": 0.0,
        # foreach AdamW's sqrt(exp_avg_sq) for every local parameter at once
        "optimizer_step": 4 * n / shards * on_device,
    }
    head = shape.vocab * shape.hidden
    if strategy == "fsdp":
        # Unsharded in compute precision: the root (embeddings, head) for the whole forward and
        # backward, and the head's gradient until the root's reduce-scatter at the end of the
        # backward; per decoder layer in the backward, its parameters, its gradients in compute
        # precision and the fp32 input of their reduce-scatter.
        parts["gather_buffers"] = (shape.embedding_params * compute + head * compute
                                   + shape.layer_params * (2 * compute + 4))
        # The root's reduce-scatter at the end: its gradients, and their fp32 reduce-scatter input.
        parts["head_gradients"] = shape.embedding_params * (compute + 4)
    else:
        # autocast's bf16 copies of the weights (its cache, for the forward)
        parts["gather_buffers"] = compute * n if batch.bf16 else 0.0
        # The embedding's gradient (fp32, dense), the head's cast to fp32, and for tied weights
        # their sum, before DDP copies it into its bucket.
        parts["head_gradients"] = (3 if shape.tied else 2) * 4 * head
    kept, recompute = activation_bytes(shape, batch, sharded_bf16=strategy == "fsdp")
    parts["activations"] = kept + recompute
    # logits, log-softmax and their gradient for one chunk, fp32
    from simpo_ray.train.logps import logps_chunk_tokens

    parts["logps_chunk"] = 3 * 4 * logps_chunk_tokens(shape.vocab) * shape.vocab
    parts["overhead"] = GPU_OVERHEAD_BYTES if gpu else 0.0
    parts["reward_model"] = compute * reward_params
    return MemoryPlan(strategy, shards, cpu_offload and strategy == "fsdp", parts, shape)


def choose(shape: ModelShape, batch: Batch, *, parallel: str, world: int, gpu_memory_gb: float | None,
           cpu_offload: bool = False, model_name: str = "the model", reward_params: float = 0.0) -> MemoryPlan:
    """The plan for `parallel` (auto|ddp|fsdp); `UserError` when it cannot fit `gpu_memory_gb`.

    `auto` is DDP when DDP fits one GPU, FSDP otherwise. Without `gpu_memory_gb` (a CPU run, or
    a space that does not declare it) nothing can be judged: nothing is refused and `auto` is DDP.
    """
    from simpo_ray.errors import UserError

    ddp = plan(shape, batch, strategy="ddp", world=world, reward_params=reward_params)
    fsdp = plan(shape, batch, strategy="fsdp", world=world, cpu_offload=cpu_offload, reward_params=reward_params)
    if gpu_memory_gb is None:
        return fsdp if parallel == "fsdp" else ddp
    if parallel == "auto":
        chosen = ddp if ddp.fits(gpu_memory_gb) else fsdp
    else:
        chosen = ddp if parallel == "ddp" else fsdp
    if not chosen.fits(gpu_memory_gb):
        p = chosen.parts
        hint = ("use parallel: fsdp or auto" if chosen.strategy == "ddp" and fsdp.fits(gpu_memory_gb)
                else "use more workers per trial, fsdp_cpu_offload: true, gradient_checkpointing: true "
                     "or a smaller per_device_train_batch_size")
        raise UserError(
            f"parallel={chosen.strategy} needs ~{chosen.total / GB:.0f} GB per GPU for {model_name} "
            f"(weights+grads+AdamW {chosen.state / GB:.0f} GB, activations ~{p['activations'] / GB:.0f} GB, "
            f"other {(chosen.total - chosen.state - p['activations']) / GB:.0f} GB); the trial's GPUs "
            f"have {gpu_memory_gb:g} GB (plans may use {FIT_MARGIN:.0%}); {hint}")
    return chosen


def shape_for(cfg: Any, params_billion: float | None = None, *, local_files_only: bool = True) -> ModelShape:
    """The model's shape from its config (`reference_models.config_for`: its own when bundled,
    local or in the hub cache, no download unless `local_files_only=False`; else the public
    config of its family; else the family closest to `params_billion`, a space's estimate)."""
    from simpo_ray.train.reference_models import config_for

    try:
        config, source = config_for(cfg.model_name_or_path, params_billion=params_billion,
                                    trust_remote_code=cfg.trust_remote_code, local_files_only=local_files_only,
                                    revision=getattr(cfg, "model_revision", None))
    except KeyError:
        from simpo_ray.errors import UserError

        raise UserError(f"cannot read the config of {cfg.model_name_or_path} to plan memory; "
                        "give estimate.params_billion in the space") from None
    return ModelShape.from_config(config, source)


def plan_for(cfg: Any, resources: Any, params_billion: float | None = None, *,
             shape: ModelShape | None = None) -> MemoryPlan | None:
    """The chosen plan for one run of `cfg` on `resources` (a `config.Resources`); `UserError`
    when it cannot fit `resources.gpu_memory_gb`; None when no GPU memory is declared (CPU)."""
    if resources.gpu_memory_gb is None:
        return None
    shape = shape or shape_for(cfg, params_billion)
    batch = Batch(cfg.per_device_train_batch_size, cfg.max_length, cfg.bf16, cfg.gradient_checkpointing)
    return choose(shape, batch, parallel=cfg.parallel, world=resources.num_workers,
                  gpu_memory_gb=resources.gpu_memory_gb, cpu_offload=cfg.fsdp_cpu_offload,
                  model_name=cfg.model_name_or_path.rsplit("/", 1)[-1], reward_params=reward_params(cfg))


def decide_strategy(cfg: Any, resources: Any, params_billion: float | None = None, *,
                    shape: ModelShape | None = None) -> str | None:
    """The one rule for a run's strategy (ddp|fsdp): `cfg.parallel` when it names one; `auto` is
    DDP without GPUs, else the memory plan's choice for `resources.gpu_memory_gb` (`choose`: DDP
    when it fits one GPU, FSDP otherwise). None when `auto` runs on GPUs whose memory the driver
    does not know: the workers then apply this rule with their device's memory."""
    if cfg.parallel != "auto":
        return cfg.parallel
    if not resources.use_gpu:
        return "ddp"
    plan = plan_for(cfg, resources, params_billion, shape=shape)
    return plan.strategy if plan else None


# Parameter counts of the reward models the spaces name, for planning without their config.
KNOWN_REWARD_PARAMS = {
    "Skywork/Skywork-Reward-V2-Llama-3.1-8B": 7.5e9,
    "Skywork/Skywork-Reward-V2-Qwen3-1.7B": 1.7e9,
    "Skywork/Skywork-Reward-V2-Qwen3-0.6B": 0.6e9,
}
UNKNOWN_REWARD_PARAMS = 8e9  # planned for when neither the config nor the table knows the model


def reward_params(cfg: Any) -> float:
    """Parameters of `cfg.reward_model_name_or_path` (0 without one): from its config when it is
    local or in the Hub cache, else `KNOWN_REWARD_PARAMS`, else an 8B model."""
    name = cfg.reward_model_name_or_path
    if not name:
        return 0.0
    try:
        from transformers import AutoConfig

        from simpo_ray.train.reward import BUNDLED_REWARDS, resolve_reward_path

        local = name in BUNDLED_REWARDS or Path(name).expanduser().is_dir()
        config = AutoConfig.from_pretrained(resolve_reward_path(name) if local else name, local_files_only=True)
        return ModelShape.from_config(config, name).total_params
    except (OSError, ValueError, KeyError, AttributeError):
        return KNOWN_REWARD_PARAMS.get(name, UNKNOWN_REWARD_PARAMS)
