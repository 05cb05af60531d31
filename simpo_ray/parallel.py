"""How a run's model is spread over its workers, and its checkpoints: DDP (Ray Train's
`prepare_model`) or FSDP2 (`fully_shard` per decoder layer, then the root), both saved with
`torch.distributed.checkpoint` so a run resumes exactly, on any number of workers."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from simpo_ray.config import TrainConfig

STATE_FILE = "trainer_state.json"      # scheduler state and counters (rank 0), plain JSON
CONFIG_FILE = "train_config.yaml"      # the run's config, for export
RNG_FILE = "rng_state_{rank}.pt"       # each rank's torch RNG state (a tensor)


# ------------------------------------------------------------------------------- building

def build_policy(cfg: TrainConfig, strategy: str, device: torch.device, rank: int, world: int):
    """The `PolicyLogps` a worker trains: (module to call, `PolicyLogps` underneath).

    DDP: the model loaded whole on every worker, wrapped by Ray Train. FSDP: built on the meta
    device (no worker holds a full copy), each `_no_split_modules` layer sharded, then the root;
    weights streamed from rank 0's copy (`broadcast_from_rank0`), so a node holds one full copy
    in CPU memory however many workers it runs.
    """
    from simpo_ray.logps import PolicyLogps
    from simpo_ray.model import load_model

    if strategy == "ddp":
        import ray.train.torch

        policy = ray.train.torch.prepare_model(PolicyLogps(load_model(cfg, device=device)))
        return policy, getattr(policy, "module", policy)
    if strategy != "fsdp":
        raise ValueError(f"unknown strategy {strategy!r}")
    policy = PolicyLogps(_empty_model(cfg))
    shard(policy, cfg, device, world)
    _fill_from_rank0(policy.model, cfg, rank)
    return policy, policy


def _empty_model(cfg: TrainConfig) -> nn.Module:
    """The model's architecture with parameters on the meta device (buffers real: rotary tables)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from simpo_ray.model import disable_dropout, enable_checkpointing, resolve_model_path

    path = resolve_model_path(cfg.model_name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
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


def shard(policy: nn.Module, cfg: TrainConfig, device: torch.device, world: int) -> None:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm, head), over all
    workers; materialise the local shards on `device` (CPU with `fsdp_cpu_offload`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
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


def _fill_from_rank0(model: nn.Module, cfg: TrainConfig, rank: int) -> None:
    from transformers import AutoModelForCausalLM

    from simpo_ray.model import resolve_model_path

    full: dict[str, torch.Tensor] = {}
    if rank == 0:
        loaded = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model_name_or_path),
                                                      dtype=torch.float32,
                                                      trust_remote_code=cfg.trust_remote_code)
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


# ------------------------------------------------------------------------------- checkpoints

def save_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, counters: dict[str, Any],
                    cfg: TrainConfig, rank: int) -> None:
    """Every rank writes its shards of model and optimizer (DCP) into `directory`; rank 0 adds the
    scheduler, counters and config as JSON/YAML, and each rank its RNG state. No pickled objects
    beyond DCP's own metadata, which is read back with a restricted unpickler."""
    directory.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))
    torch.save(torch.get_rng_state(), directory / RNG_FILE.format(rank=rank))
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps(
            {"scheduler": scheduler.state_dict(), "counters": counters}, indent=1))
        (directory / CONFIG_FILE).write_text(cfg.to_yaml())


def load_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, rank: int) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote (resharding to this run's workers); returns the counters."""
    check_metadata(directory)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(directory)))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    saved = json.loads((directory / STATE_FILE).read_text())
    scheduler.load_state_dict(saved["scheduler"])
    rng = directory / RNG_FILE.format(rank=rank)
    if rng.exists():
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return saved["counters"]


def export_pretrained(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A plain Hugging Face model directory (`save_pretrained`, with the tokenizer) from a
    checkpoint of any strategy and worker count; the full state dict is gathered once, here."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from simpo_ray.config import load_train_config
    from simpo_ray.errors import UserError
    from simpo_ray.model import load_tokenizer, resolve_model_path

    import transformers

    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar in a summary
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not (checkpoint / CONFIG_FILE).is_file() or not (checkpoint / ".metadata").is_file():
        raise UserError(f"{checkpoint}: not a simpo-ray checkpoint (no {CONFIG_FILE} or .metadata)")
    check_metadata(checkpoint)
    cfg = load_train_config(checkpoint / CONFIG_FILE)
    path = resolve_model_path(cfg.model_name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=SafeFileSystemReader(str(checkpoint)), no_dist=True)
    model.load_state_dict(state["model"])
    if cfg.bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir)
    load_tokenizer(cfg).save_pretrained(out_dir)
    return out_dir


def check_metadata(directory: Path) -> None:
    """`UserError` (one line) unless the checkpoint's DCP metadata reads with the restricted unpickler."""
    from simpo_ray.errors import UserError

    try:
        SafeFileSystemReader(str(directory)).read_metadata()
    except (pickle.UnpicklingError, EOFError, OSError, AttributeError, ValueError) as e:
        raise UserError(f"{directory}/.metadata: not a readable simpo-ray checkpoint: {e}") from None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` only: its dataclasses, torch sizes/dtypes, builtin containers."""

    ALLOWED_PREFIXES = ("torch.distributed.checkpoint.", "torch.distributed._shard.", "collections")
    ALLOWED = {("torch", "Size"), ("torch", "device"), ("builtins", "set"), ("builtins", "frozenset"),
               ("builtins", "slice"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED or module.startswith(self.ALLOWED_PREFIXES) or (
                module == "torch" and name in _DTYPE_NAMES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a "
                                     "simpo-ray checkpoint never holds; refusing to load it")


_DTYPE_NAMES = {str(d).removeprefix("torch.") for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


class SafeFileSystemReader(dcp.FileSystemReader):
    """`FileSystemReader` whose metadata is read with `_MetadataUnpickler` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
