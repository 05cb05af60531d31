"""Where the training loop runs: a Ray Train worker, or the caller's own process.

The loop asks its worker for its rank, world size and device, to put the model and data loader
on the device, for the checkpoint to restart from, and to report. `RayTrainWorker` answers with
Ray Train's worker APIs (a `TorchTrainer` run: the train CLI, multi-worker trials).
`InProcessWorker` is one worker in the calling process, what Ray Train's local mode
(`ScalingConfig(num_workers=0)`) is; Ray refuses its `ray.train.*` worker APIs inside a Tune
trial (ray/train/v2/_internal/util.py: `requires_train_worker`), so a single-worker trial that
trains in its own process (`simpo_ray.infra.local_run`) uses this one: rank 0 of 1, the GPU Ray
gave the trial (else the CPU), reports to a sink that persists them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class RayTrainWorker:
    """A worker of a Ray Train run."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint(self):
        """Ray Train's latest checkpoint of this run (a restart), else None."""
        import ray.train

        return ray.train.get_checkpoint()

    def prepare_loader(self, loader):
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)

    def prepare_model(self, module: torch.nn.Module, **ddp_kwargs: Any) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=ddp_kwargs)

    def checkpoint_dir(self):
        """Where to write a checkpoint that `report` then hands over (a temporary directory: Ray
        Train copies it to the run's storage)."""
        import tempfile

        return tempfile.TemporaryDirectory()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """`ray.train.report` (a barrier over the workers); the checkpoint is Ray's to persist."""
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))


class InProcessWorker:
    """The one worker of a run in the calling process; `sink(metrics, checkpoint_dir)` persists
    each report before it returns (the checkpoint directory is deleted after)."""

    rank, world = 0, 1

    def __init__(self, sink: Callable[[dict[str, Any], str | None], None], staging=None) -> None:
        self.sink, self.staging = sink, staging
        self.device = _own_device()

    def checkpoint_dir(self):
        """The sink's staging directory where it has one (in the run's folder: handed over by a
        rename, nothing copied or deleted), else a temporary directory."""
        if self.staging is not None:
            return self.staging()
        import tempfile

        return tempfile.TemporaryDirectory()

    def checkpoint(self):
        return None  # a restart's checkpoint arrives as `resume_from` with `restart`

    def prepare_loader(self, loader):
        return _OnDevice(loader, self.device) if self.device.type != "cpu" else loader

    def prepare_model(self, module: torch.nn.Module, **ddp_kwargs: Any) -> torch.nn.Module:
        return module.to(self.device)  # one worker: nothing to all-reduce, as prepare_model does

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.sink(metrics, checkpoint_dir)


def _own_device() -> torch.device:
    """The GPU Ray gave the trial (its id's place in CUDA_VISIBLE_DEVICES, as Ray Train's
    `get_device` finds it), else the CPU; a GPU given to a process where CUDA is unusable is an
    error, not a silent CPU run."""
    import os

    import ray

    ids = [str(i) for i in ray.get_gpu_ids()] if ray.is_initialized() else []
    if not ids:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from simpo_ray.errors import UserError

        raise UserError(f"Ray gave this trial GPU {ids[0]} but torch cannot use CUDA here "
                        f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); install a CUDA build of torch")
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    index = visible.index(ids[0]) if ids[0] in visible else int(ids[0])
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


class _OnDevice:
    """A data loader whose batches' tensors are moved to `device` (Ray's prepared loader does this)."""

    def __init__(self, loader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
