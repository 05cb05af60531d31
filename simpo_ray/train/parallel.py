"""How a run's model is spread over its workers: DDP (Ray Train's `prepare_model`) or FSDP2
(`fully_shard` per decoder layer, then the root, weights from rank 0's copy); the gradient norm
over all shards. The checkpoints of both strategies are `simpo_ray.train.checkpoints`."""

from __future__ import annotations


import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
)

from simpo_ray.config import TrainConfig



# ------------------------------------------------------------------------------- building

def build_policy(cfg: TrainConfig, strategy: str, device: torch.device, rank: int, world: int, *,
                 prepare=None):
    """The `PolicyLogps` a worker trains: (module to call, `PolicyLogps` underneath).

    DDP: the model loaded whole on every worker, wrapped by `prepare` (the worker's
    `prepare_model`: Ray Train's DDP wrapper, or the device alone for one in-process worker). FSDP: built on the meta
    device (no worker holds a full copy), each `_no_split_modules` layer sharded, then the root;
    weights streamed from rank 0's copy (`broadcast_from_rank0`), so a node holds one full copy
    in CPU memory however many workers it runs.
    """
    from simpo_ray.train.logps import PolicyLogps
    from simpo_ray.train.model import apply_liger_kernel, load_model

    if strategy == "ddp":
        if prepare is None:
            from simpo_ray.train.worker import RayTrainWorker

            prepare = RayTrainWorker().prepare_model
        model = load_model(cfg, device=device)
        if cfg.use_liger_kernel:
            apply_liger_kernel(model, device)
        # Gradients as views into DDP's all-reduce buckets: without it DDP keeps a second copy of
        # every gradient in its buckets (4 bytes x all parameters; measured on an H200: 3B under
        # DDP allocated 77 GB against a 60 GB plan, docs/benchmarks.md).
        policy = prepare(PolicyLogps(model, compile=cfg.torch_compile, compile_blocks=cfg.torch_compile is True), gradient_as_bucket_view=True)
        return policy, getattr(policy, "module", policy)
    if strategy != "fsdp":
        raise ValueError(f"unknown strategy {strategy!r}")
    model = empty_model(cfg)
    if cfg.use_liger_kernel:
        apply_liger_kernel(model, device)  # on the meta model: it rebinds modules' forward methods only
    policy = PolicyLogps(model, compile=cfg.torch_compile, compile_blocks=cfg.torch_compile is True)
    shard(policy, cfg, device, world)
    _fill_from_rank0(policy.model, cfg, rank)
    return policy, policy


def empty_model(cfg: TrainConfig, config=None) -> nn.Module:
    """The model's architecture with parameters on the meta device (buffers real: rotary tables);
    `config`: the transformers config to build (default: the model's own)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from simpo_ray.train.model import disable_dropout, enable_checkpointing, model_config

    if config is None:
        config = model_config(cfg)
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 trust_remote_code=cfg.trust_remote_code, **kwargs)
    # Tied input/output embeddings must stay ONE parameter (built under init_empty_weights they
    # come out as two, and would then train apart).
    model.tie_weights()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False) and head is not None \
            and head.weight is not embed.weight:
        raise RuntimeError(f"{type(model).__name__}: tie_word_embeddings is set but the head and the "
                           "embedding are separate parameters after tie_weights()")
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model


def shard(policy: nn.Module, cfg: TrainConfig, device: torch.device, world: int, mesh=None) -> list[nn.Module]:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm, head), over all
    workers (`mesh`: default, a 1-D mesh of `world` on `device`); materialise the local shards on
    `device` (CPU with `fsdp_cpu_offload`). Returns the decoder layers, in order."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = mesh if mesh is not None else init_device_mesh(device.type, (world,))
    kwargs = {
        "mesh": mesh,
        "mp_policy": (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                      if cfg.bf16 else MixedPrecisionPolicy()),
        "offload_policy": CPUOffloadPolicy() if cfg.fsdp_cpu_offload else OffloadPolicy(),
    }
    layer_names = set(getattr(policy.model, "_no_split_modules", None) or [])
    layers = [m for m in policy.model.modules() if type(m).__name__ in layer_names]
    if not layers:
        raise ValueError(f"{type(policy.model).__name__} names no decoder layer class "
                         "(_no_split_modules); FSDP needs one to shard by")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(policy, **kwargs)
    # to_empty replaces buffers too: keep the real ones (rotary inv_freq) across it.
    buffers = {name: b.clone() for name, b in policy.named_buffers() if not b.is_meta}
    policy.to_empty(device="cpu" if cfg.fsdp_cpu_offload else device)
    with torch.no_grad():
        for name, b in policy.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    from torch.distributed.fsdp import register_fsdp_forward_method

    register_fsdp_forward_method(policy, "generate")
    return layers


def _fill_from_rank0(model: nn.Module, cfg: TrainConfig, rank: int) -> None:
    """The sharded fp32 parameters filled from rank 0's full copy of the checkpoint, read in
    ``torch_dtype`` (a bf16 read halves that copy and the broadcast; each shard's copy into its fp32
    parameter casts: the fp32 master weights the optimizer needs)."""
    from transformers import AutoModelForCausalLM

    from simpo_ray.train.model import pretrained_kwargs, read_dtype, resolve_model_path

    full: dict[str, torch.Tensor] = {}
    if rank == 0:
        loaded = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model_name_or_path),
                                                      dtype=read_dtype(cfg), **pretrained_kwargs(cfg))
        full = loaded.state_dict()
        del loaded
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


# ------------------------------------------------------------------------------- measuring

def local_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this worker holds of the parameters and of the optimizer state (local shards only)."""
    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    params = sum(nbytes(p) for p in module.parameters())
    optim = 0
    if optimizer is not None:
        optim = sum(nbytes(v) for s in optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v) and v.dim() > 0)
    return {"param_bytes": params, "optimizer_bytes": optim}


def clip_grad_norm(module: nn.Module, max_norm: float) -> torch.Tensor:
    """The gradient norm over all workers' shards, clipped to `max_norm` (0: measured only,
    as the reference trainer's `max_grad_norm: 0` turns clipping off)."""
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


