"""The workers' own training step at a space's real size, on a laptop: no GPU, no storage.

Fake tensors (`FakeTensorMode`: shapes, dtypes and devices, no data) and a fake process group
of the trial's world size (`torch.testing._internal.distributed.fake_pg`: every collective
returns at once) run the code a worker runs: `parallel.shard` (FSDP2) or DDP with
`gradient_as_bucket_view`, `PolicyLogps`, `step.forward_backward` per micro-batch,
`parallel.clip_grad_norm`, the config's AdamW (`train.optim`; foreach, as on CUDA) and
`zero_grad(set_to_none=True)`, with the resident reward model beside them. A dispatch mode
counts the bytes of every live storage this worker holds (its own shards, never DTensor's
global-shape shape inference) and keeps the peak with its parts: parameters, gradients,
optimizer state, reward model, and the rest (activations, temporaries, all-gather and
reduce-scatter buffers).

How it differs from a GPU, on purpose or by necessity (docs/design.md, "Memory trace"):
- Every sequence is `max_length` long and every position a label (the padded worst case:
  fake tensors have no data, so `nonzero` is answered with every index).
- Two micro-batches per optimizer step stand for `gradient_accumulation_steps` (each further
  one repeats the second's memory: gradients are accumulated in place), two steps (the first
  allocates AdamW's state).
- FSDP runs its CPU path (this build has no CUDA streams): the next layer's all-gather is
  issued explicitly one layer ahead, as CUDA's separate all-gather stream lets it run.
- Not traced: the CUDA context, NCCL's buffers, the caching allocator's reserve and
  fragmentation (`memory.GPU_OVERHEAD_BYTES` plans them), PolicyLogps' one-time check of its
  log-probs, evaluation and the generation KV cache (planned by `memory.kv_cache_bytes`).
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from simpo_ray.config import TrainConfig

CATEGORIES = ("parameters", "gradients", "optimizer", "reward_model", "other")
MICRO_BATCHES = 2
STEPS = 2


@dataclass(frozen=True)
class Trace:
    strategy: str
    world: int
    peak: float                    # bytes of live tensors at the worst moment of a step
    parts: dict[str, float]        # the peak by CATEGORIES (last step)
    peak_by_step: tuple[float, ...]
    phase: str                     # where the peak is: forward and backward, or the optimizer step
    micro_batches: int
    ops: int
    seconds: float

    def summary(self) -> str:
        p = self.parts
        return (f"traced {self.strategy} over {self.world} worker(s): {size(self.peak)} per worker at the peak, in the "
                f"{self.phase} (parameters {size(p['parameters'])}, gradients {size(p['gradients'])}, optimizer "
                f"{size(p['optimizer'])}, reward model {size(p['reward_model'])}, activations, temporaries and "
                f"buffers {size(p['other'])}; {self.ops} ops in {self.seconds:.0f} s)")


def size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class LiveBytes(TorchDispatchMode):
    """Bytes of the live storages that ops of `fake_mode` create on `device_type`, by category,
    and the peak with its parts. Storages are counted once (views share them) and leave the
    count when Python frees them. Tensors of another fake mode (DTensor's shape propagation
    runs ops on global-shape fakes of its own) and meta tensors are not this worker's memory."""

    def __init__(self, fake_mode, device_type: str) -> None:
        super().__init__()
        self.fake_mode, self.device_type = fake_mode, device_type
        self.live: dict[int, list] = {}          # storage key -> [bytes, category]
        self.by_category = dict.fromkeys(CATEGORIES, 0)
        self.total = self.peak = 0
        self.at_peak = dict(self.by_category)
        self.ops = 0
        self.phase = self.peak_phase = "set-up"

    def track(self, t: torch.Tensor | None, category: str = "other") -> None:
        """Count `t`'s storage under `category` (re-tag it when it is counted already)."""
        from torch._subclasses.fake_tensor import FakeTensor

        if t is None:
            return
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.device.type != self.device_type or (
                self.fake_mode is not None and not (isinstance(t, FakeTensor) and t.fake_mode is self.fake_mode)):
            return
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self.live.get(key)
        if entry is not None:
            if entry[1] != category and category != "other":
                self.by_category[entry[1]] -= entry[0]
                self.by_category[category] += entry[0]
                entry[1] = category
            return
        size = storage.nbytes()
        self.live[key] = [size, category]
        self.by_category[category] += size
        self.total += size
        if self.total > self.peak:
            self.peak, self.at_peak, self.peak_phase = self.total, dict(self.by_category), self.phase
        weakref.finalize(storage, self._free, key)

    def _resized(self, storage) -> None:
        entry = self.live.get(storage._cdata)
        if entry is None:
            return
        size = storage.nbytes()
        self.total += size - entry[0]
        self.by_category[entry[1]] += size - entry[0]
        entry[0] = size
        if self.total > self.peak:
            self.peak, self.at_peak, self.peak_phase = self.total, dict(self.by_category), self.phase

    def __enter__(self):
        # FSDP frees and re-allocates its unsharded parameters and gradients in place, by
        # resizing their storage: a storage method, not an op, so it is followed here.
        original = self._original_resize = torch.UntypedStorage.resize_

        def resize_(storage, size):
            out = original(storage, size)
            self._resized(storage)
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*exc)

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.total -= entry[0]
            self.by_category[entry[1]] -= entry[0]

    def reset_peak(self) -> None:
        self.peak, self.at_peak, self.peak_phase = self.total, dict(self.by_category), self.phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if self.fake_mode is not None and func is torch.ops.aten.nonzero.default and args[0].dim() == 1:
            # Data-dependent: fake tensors hold no data. The padded worst case: every index.
            x = args[0]
            out = torch.arange(x.numel(), device=x.device).unsqueeze(1)
        else:
            out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def _fake_batches(cfg: TrainConfig, vocab: int, n: int, device) -> list[dict[str, torch.Tensor]]:
    shape = (cfg.per_device_train_batch_size, cfg.max_length)
    batches = []
    for _ in range(n):
        batch = {}
        for side in ("chosen", "rejected"):
            batch[f"{side}_input_ids"] = torch.randint(0, vocab, shape, device=device)
            batch[f"{side}_attention_mask"] = torch.ones(shape, dtype=torch.long, device=device)
            batch[f"{side}_labels"] = torch.randint(0, vocab, shape, device=device)
        batches.append(batch)
    return batches


def trace_step(cfg: TrainConfig, model_config, *, world: int, strategy: str, reward_config=None,
               steps: int = STEPS, micro_batches: int | None = None, fake: bool = True) -> Trace:
    """Trace rank 0 of a `world`-worker run of `cfg` under `strategy` ('ddp' or 'fsdp') for a
    model of `model_config` (a transformers config), with the reward model of `reward_config`
    (or none) resident as the workers keep it. `fake=False` runs the same on real CPU tensors
    (world 1, gloo), which is how the trace is checked against a real run's bytes.
    `micro_batches`: per optimizer step (default: the accumulation, at most MICRO_BATCHES)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from simpo_ray.train import parallel
    from simpo_ray.train.logps import PolicyLogps
    from simpo_ray.train.optim import build_optimizer
    from simpo_ray.train.step import forward_backward, zero_grad

    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
    micro_batches = micro_batches or min(MICRO_BATCHES, cfg.gradient_accumulation_steps)
    if dist.is_initialized():
        raise RuntimeError("trace_step starts its own (fake) process group; one is already initialised")
    t0 = time.perf_counter()
    if fake:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    elif world == 1:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    else:
        raise ValueError("a real (fake=False) trace runs one worker")
    try:
        device = torch.device("cpu")
        mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
        live = LiveBytes(mode if fake else None, device.type)
        mesh = None
        if strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device.type, (world,))
        policy = PolicyLogps(parallel.empty_model(cfg, model_config), compile=False)  # the eager step's bytes
        policy._verified = True  # its one-time check reads values (a no-grad forward of one row)
        objective = dict(beta=cfg.beta, gamma_beta_ratio=cfg.gamma_beta_ratio, loss_type=cfg.loss_type,
                         label_smoothing=cfg.label_smoothing, sft_weight=cfg.sft_weight)
        reward = _reward_model(reward_config, cfg) if reward_config is not None else None
        with mode, live, warnings.catch_warnings():
            # FSDP2 warns that PolicyLogps returns views (the objective changes none in place)
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
            if strategy == "fsdp":
                layers = parallel.shard(policy, cfg, device, world, mesh=mesh)
                for layer, following in zip(layers, layers[1:]):
                    layer.set_modules_to_forward_prefetch([following])  # what CUDA's all-gather stream does
                module = policy
            else:
                policy.to_empty(device=device)
                policy.model.tie_weights()  # to_empty from meta to fake makes new parameters: tie again
                # init_sync=False: the start-up broadcast reads values (a 250 MB bucket at a time, once)
                module = torch.nn.parallel.DistributedDataParallel(policy, gradient_as_bucket_view=True,
                                                                   init_sync=False)
                module.register_comm_hook(world, _in_place_all_reduce)
                module.reducer = _NoRebuild(module.reducer)
            for p in policy.parameters():
                live.track(p, "parameters")
                if not fake:  # real tensors: small values, not to_empty's garbage (NaN, denormals: slow)
                    with torch.no_grad():
                        (p.to_local() if hasattr(p, "to_local") else p).normal_(0.0, 0.02)
            if reward is not None:
                _count_reward_model(reward, device, live)
            optimizer = build_optimizer(cfg, module.parameters(), foreach=True)  # the config's, foreach as on CUDA
            batches = _fake_batches(cfg, model_config.get_text_config().vocab_size, micro_batches, device)
            peaks = []
            for _ in range(steps):
                live.reset_peak()
                for i, batch in enumerate(batches):
                    live.phase = "forward and backward"
                    forward_backward(module, batch, cfg, objective, device, strategy, sync=i == len(batches) - 1)
                    for p in policy.parameters():
                        live.track(p.grad, "gradients")
                live.phase = "optimizer step"
                parallel.clip_grad_norm(module, cfg.max_grad_norm)
                # (the divergence check and its all-reduce read values: a scalar, left out)
                optimizer.step()
                for state in optimizer.state.values():
                    for v in state.values():
                        if torch.is_tensor(v):
                            live.track(v, "optimizer")
                zero_grad(optimizer, strategy)
                peaks.append(float(live.peak))
            parts = {k: float(v) for k, v in live.at_peak.items()}
    finally:
        dist.destroy_process_group()
    return Trace(strategy, world, max(peaks), parts, tuple(peaks), live.peak_phase, micro_batches, live.ops,
                 time.perf_counter() - t0)


class _NoRebuild:
    """DDP's reducer, except that it keeps its buckets in construction order after the first
    step (rebuilding them in gradient order broadcasts the order: a read of values; the buckets'
    bytes are the same either way)."""

    def __init__(self, reducer) -> None:
        self._reducer = reducer

    def _rebuild_buckets(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._reducer, name)


def _in_place_all_reduce(world: int, bucket):
    """DDP's default hook, all-reduce in place then average, with the fake group's collective
    left out (its future carries no tensor, which DDP's reducer refuses)."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer().div_(world))
    return fut


def _reward_model(config, cfg: TrainConfig):
    """The reward model every worker keeps for generation-quality evaluation (`train.reward`:
    a sequence classifier, bf16 under `bf16`), built here as fake tensors and counted."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    config.num_labels = 1
    with init_empty_weights(include_buffers=False):
        model = AutoModelForSequenceClassification.from_config(config)
    model.to(torch.bfloat16 if cfg.bf16 else torch.float32)
    return model


def _count_reward_model(model, device, live: LiveBytes) -> None:
    model.to_empty(device=device)
    for t in list(model.parameters()) + list(model.buffers()):
        live.track(t, "reward_model")


@dataclass(frozen=True)
class TracedRun:
    """One trial's traces beside its plans, one per strategy traced."""
    traces: list[Trace]
    plans: list[Any]              # memory.MemoryPlan, the same strategy as traces[i]
    chosen: str | None            # the strategy the run would use
    source: str                   # where the model's shape came from


def trace_run(cfg: TrainConfig, resources: Any, params_billion: float | None = None) -> TracedRun:
    """Traces of one trial of `cfg` on `resources` (a `config.Resources`), with the plan of each:
    the strategy the run would use, or both when `parallel: auto` decides between them. The
    model's shape, the reward model and the strategy come from the same sources as the plan's."""
    from simpo_ray.train import memory
    from simpo_ray.train.reference_models import config_for

    config, source = config_for(cfg.model_name_or_path, params_billion=params_billion,
                                trust_remote_code=cfg.trust_remote_code, revision=cfg.model_revision)
    reward = None
    name = cfg.reward_model_name_or_path
    if name:
        from simpo_ray.train.reward import BUNDLED_REWARDS, resolve_reward_path

        try:
            reward, _ = config_for(resolve_reward_path(name) if name in BUNDLED_REWARDS else name)
        except KeyError:  # not readable offline and not a known family: planned by its size only
            reward = None
    shape = memory.ModelShape.from_config(config, source)
    chosen = memory.decide_strategy(cfg, resources, params_billion, shape=shape)
    strategies = ("ddp", "fsdp") if cfg.parallel == "auto" else (chosen,)
    batch = memory.Batch(cfg.per_device_train_batch_size, cfg.max_length, cfg.bf16, cfg.gradient_checkpointing)
    plans = [memory.plan(shape, batch, strategy=s, world=resources.num_workers,
                         gpu=resources.gpu_memory_gb is not None, cpu_offload=cfg.fsdp_cpu_offload,
                         reward_params=memory.reward_params(cfg)) for s in strategies]
    traces = [trace_step(cfg, config, world=resources.num_workers, strategy=s, reward_config=reward)
              for s in strategies]
    return TracedRun(traces, plans, chosen, source)
