"""A run's checkpoints, for both strategies: every rank's shards of model and optimizer through
`torch.distributed.checkpoint` (resharded to any worker count on load), the scheduler and
counters as JSON, each rank's RNG state as a tensor, and the export of any checkpoint to a plain
Hugging Face directory. DCP's pickled `.metadata` is read with a restricted unpickler."""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from simpo_ray.config import TrainConfig, load_train_config
from simpo_ray.errors import UserError, one_line

STATE_FILE = "trainer_state.json"      # scheduler state and counters (rank 0), plain JSON
CONFIG_FILE = "train_config.yaml"      # the run's config, for export
RNG_FILE = "rng_state_{rank}.pt"       # each rank's torch RNG state (a tensor)


@contextlib.contextmanager
def _one_process_is_meant():
    """A run of one worker in its own process (no process group: a search's in-process trial,
    export) saves and loads in one process, as intended; DCP warns so on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, counters: dict[str, Any],
                    cfg: TrainConfig, rank: int) -> None:
    """Every rank writes its shards of model and optimizer (DCP) into `directory`; rank 0 adds the
    scheduler, counters and config as JSON/YAML, and each rank its RNG state. No pickled objects
    beyond DCP's own metadata, which is read back with a restricted unpickler."""
    directory.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _one_process_is_meant():
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
    _safe_load(state, directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    saved = json.loads((directory / STATE_FILE).read_text())
    scheduler.load_state_dict(saved["scheduler"])
    rng = directory / RNG_FILE.format(rank=rank)
    if rng.exists():
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return saved["counters"]


def saved_counters(directory: Path) -> dict[str, Any] | None:
    """The counters a checkpoint holds (read before anything is built, to keep its recipe); None
    when it has none (`load_checkpoint` then says what is wrong with it)."""
    try:
        return parse_counters((Path(directory) / STATE_FILE).read_text())
    except OSError:
        return None


def parse_counters(text: str) -> dict[str, Any] | None:
    try:
        return json.loads(text)["counters"]
    except (ValueError, KeyError, TypeError):
        return None


def recipe(cfg: TrainConfig, world: int, total_steps: int) -> dict[str, int]:
    """What a resumed run must keep to train the same way: the global batch (per-device batch x
    workers x accumulation) and the length of the learning-rate schedule."""
    return {"world": world, "per_device": cfg.per_device_train_batch_size,
            "accumulation": cfg.gradient_accumulation_steps, "total_steps": total_steps}


def keep_recipe(saved: dict[str, Any] | None, cfg: TrainConfig, world: int) -> tuple[TrainConfig, int | None, str]:
    """Resuming `saved` (a checkpoint's counters) on `world` workers with `cfg`: the config with the
    gradient accumulation that keeps the checkpoint's global batch, the schedule length to keep
    (None: compute it), and a line saying what changed ("" when nothing did). `UserError` in one
    line when the global batch cannot be kept. Checkpoints from before recipes were recorded
    resume as before."""
    import dataclasses

    from simpo_ray.errors import UserError

    old = (saved or {}).get("recipe")
    if not old:
        return cfg, None, ""
    global_batch = old["per_device"] * old["world"] * old["accumulation"]
    per_step = cfg.per_device_train_batch_size * world
    if global_batch % per_step:
        raise UserError(
            f"cannot resume on {world} worker(s) x {cfg.per_device_train_batch_size} pairs per device: the "
            f"checkpoint trained with a global batch of {global_batch} pairs ({old['world']} worker(s) x "
            f"{old['per_device']} x accumulation {old['accumulation']}), which {per_step} pairs per "
            "micro-batch does not divide; use a per_device_train_batch_size x workers that divides it")
    accumulation = global_batch // per_step
    note = ""
    if (world, cfg.per_device_train_batch_size, accumulation) != (old["world"], old["per_device"], old["accumulation"]):
        note = (f"resumed on {world} worker(s) x {cfg.per_device_train_batch_size} per device: gradient "
                f"accumulation {accumulation} (was {old['world']} x {old['per_device']} x "
                f"{old['accumulation']}) keeps the global batch of {global_batch} pairs and the "
                f"{old['total_steps']}-step schedule")
    # max_steps given: it sets the schedule (as it did when the checkpoint was written); by epochs,
    # the saved length, which len(loader) on another worker count would change by rounding.
    kept = None if cfg.max_steps > 0 else old["total_steps"]
    return dataclasses.replace(cfg, gradient_accumulation_steps=accumulation), kept, note


def batches_done_here(counters: dict[str, Any], cfg: TrainConfig, world: int) -> int:
    """The checkpoint's position in its epoch, in this run's per-worker batches (the same pairs:
    every worker draws from one shuffled order, a global batch at a time)."""
    old = counters.get("recipe")
    if not old:
        return counters["batch_in_epoch"]
    pairs = counters["batch_in_epoch"] * old["per_device"] * old["world"]
    return pairs // (cfg.per_device_train_batch_size * world)


def is_checkpoint(directory: Path) -> bool:
    """Whether `directory` looks like what `save_checkpoint` writes (its config and DCP's metadata)."""
    return (Path(directory) / CONFIG_FILE).is_file() and (Path(directory) / ".metadata").is_file()


def export_pretrained(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A plain Hugging Face model directory (`save_pretrained`, with the tokenizer) from a
    checkpoint of any strategy and worker count; the full state dict is gathered once, here."""
    from transformers import AutoModelForCausalLM

    from simpo_ray.train.model import export_dtype, load_tokenizer, model_config

    import transformers

    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar in a summary
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not is_checkpoint(checkpoint):
        raise UserError(f"{checkpoint}: not a simpo-ray checkpoint (no {CONFIG_FILE} or .metadata)")
    check_metadata(checkpoint)
    cfg = load_train_config(checkpoint / CONFIG_FILE)
    config = model_config(cfg)  # at model_revision
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        _safe_load(state, checkpoint, no_dist=True)
    model.load_state_dict(state["model"])
    model = model.to(export_dtype(cfg))  # torch_dtype's ("auto": the base checkpoint's), else bf16 under bf16
    model.save_pretrained(out_dir)
    load_tokenizer(cfg).save_pretrained(out_dir)
    return out_dir


def check_metadata(directory: Path) -> None:
    """`UserError` (one line) unless the checkpoint's DCP metadata reads with the restricted unpickler."""
    try:
        SafeFileSystemReader(str(directory)).read_metadata()
    except (pickle.UnpicklingError, EOFError, OSError, AttributeError, ValueError) as e:
        raise UserError(f"{directory}/.metadata: not a readable simpo-ray checkpoint: {e}") from None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` only: exactly the classes DCP writes there (torch 2.x), torch
    sizes and dtypes, and builtin containers. Exact (module, name) pairs: no module prefixes, and
    no dotted names, which pickle protocol 4 resolves through module attributes
    (`("torch.distributed.checkpoint.filesystem", "os.system")` is `os.system`)."""

    ALLOWED = {
        *(("torch.distributed.checkpoint.metadata", n) for n in (
            "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
            "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"), ("torch", "device"), ("torch.serialization", "_get_layout"),
        ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
        ("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED or (module == "torch" and name in _DTYPE_NAMES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a "
                                     "simpo-ray checkpoint never holds; refusing to load it")


_DTYPE_NAMES = {str(d).removeprefix("torch.") for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with its one unpickling of checkpoint data made safe. DCP stores what is
    not a tensor (the optimizer's `param_groups`: numbers, strings, lists) as pickled bytes and
    reads them back with `torch.load(weights_only=False)`, which runs whatever code a crafted
    checkpoint holds; here they are read with `weights_only=True`, which builds tensors and plain
    containers of numbers and strings only. Tensors DCP already reads with `weights_only=True`."""

    def load_bytes(self, read_item, value) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"(?i)unsupported:? GLOBAL (\S+)", str(e))
            what = f"it refers to {found.group(1)}" if found else one_line(e, first=True)
            raise UserError(f"checkpoint entry {read_item.dest_index.fqn} is not plain data ({what}), "
                            "which a simpo-ray checkpoint never holds; refusing to load it") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _safe_load(state: dict, directory: Path, *, no_dist: bool = False) -> None:
    """`dcp.load` of `state` from `directory` through the restricted metadata reader and the safe
    planner; a refused or unreadable entry is one `UserError` line naming the checkpoint."""
    try:
        with _one_process_is_meant():
            dcp.load(state, storage_reader=SafeFileSystemReader(str(directory)), planner=_SafeLoadPlanner(),
                     no_dist=no_dist)
    except CheckpointException as e:  # DCP gathers each rank's error as (exception, traceback)
        first = next(iter(e.failures.values()), (e, None))[0]
        raise UserError(f"{directory}: cannot load the checkpoint: {one_line(first, first=True)}") from None


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
