"""One GPU, one process: peak memory, step time and MFU of simpo-ray's SimPO training step under
FSDP2 and DDP, beside the memory planner's estimate for the same shape and batch.

What it measures. For the Llama-3.2-1B and Llama-3.2-3B shapes (random fp32 master weights built
on the GPU from a `LlamaConfig`, nothing downloaded) and the batch of `search_spaces/1b-3b.yaml`
(per_device_train_batch_size, gradient_accumulation_steps, max_length, max_prompt_length,
gradient_checkpointing, bf16), it trains 1 warm-up + `--steps` timed optimizer steps of the step
the Ray Train workers run (`simpo_ray/train/loop.py`): per micro-batch ONE forward of the
concatenated chosen+rejected batch through `PolicyLogps`, `simpo_objective` with sft_weight > 0,
backward of loss / accumulation (gradient sync only on the last micro-batch), then
`parallel.clip_grad_norm(policy, 1.0)`, AdamW (torch's default implementation: foreach on CUDA)
and `zero_grad(set_to_none=True)`. Two strategies, each on a single-process group (world size 1,
nccl on CUDA, gloo on CPU):

- fsdp: `parallel.shard` itself (meta-device build, `fully_shard` per `_no_split_modules` layer
  then the root, `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` under bf16);
- ddp: `DistributedDataParallel(PolicyLogps(model))` over fp32 weights with bf16 autocast, as
  Ray Train's `prepare_model` builds it for the project on a multi-worker run (gradient views
  into the buckets, `gradient_as_bucket_view=True`; `--ddp-bucket-view off` for DDP's default,
  False, which Ray does not change: the first H200 run measured that).

One Markdown row per (shape, strategy): parameters, micro-batch x sequence x accumulation, the
peak of `torch.cuda.max_memory_allocated` / `max_memory_reserved`, the bytes on the device that
are not PyTorch's (CUDA context, NCCL, cuBLAS workspaces: device used minus reserved at the end
of the arm), the planner's total (`memory.plan`, world=1) and its parts, measured/plan ratios,
the median step time (cuda-synchronised), tokens/s and MFU = 6 N tokens / step time / peak
(tokens: every position of the concatenated batch x accumulation; 6N ignores the recompute of
gradient checkpointing, so the hardware does ~8N of work per token). An OOM is a row, not a crash.

Run it on a GPU box (from the repository root; needs only torch, transformers, accelerate, pyyaml):

    PYTHONPATH=. python3 bench/gpu_check.py --out bench/results/gpu_check.json
    PYTHONPATH=. python3 bench/gpu_check.py --shapes 3b --strategies ddp --steps 2   # a subset

`--dry-run` runs the same code on a tiny Llama on the CPU (gloo, 2 layers, hidden 64, vocab 512,
seq 32, micro-batch 2, accumulation 2, 2 timed steps), in well under a minute; memory columns
are then "n/a (cpu)".

What it does NOT measure: collectives between GPUs (world size 1: DDP's all-reduce and FSDP's
all-gather / reduce-scatter move no bytes over NVLink or the network, so multi-GPU step time will
be higher), NCCL's communication buffers for more than one peer, the reward model and generation
of the evaluation, data loading, the lr scheduler, checkpoint saving, and the real data's length
distribution (every sequence is max_length long; rejected ones end in max_length/8 padding
positions so attention runs with a padding mask, as on real batches).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import importlib
import json
import math
import os
import re
import socket
import statistics
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/gpu_check.py` without PYTHONPATH or an install
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here reads the Hub; the GPU box has no network


# ------------------------------------------------------------------------------- project code

@functools.cache
def _project() -> types.SimpleNamespace:
    """Every simpo-ray import of this script, and the only place to edit when modules move.

    Each module is looked up at `simpo_ray.train.<mod>` first, then `simpo_ray.<mod>` (the flat
    layout). Only modules that import neither ray, datasets nor optuna at import time (checked
    by tests/test_gpu_check.py): memory (stdlib), loss, logps, step (torch), parallel and model
    (torch, transformers, simpo_ray.config: yaml). `train/loop.py` imports ray and is not used:
    the step below is the loop's, piece by piece."""
    found: dict[str, str] = {}

    def load(mod: str) -> types.ModuleType:
        errors = []
        for name in (f"simpo_ray.train.{mod}", f"simpo_ray.{mod}"):
            try:
                module = importlib.import_module(name)
            except ImportError as e:
                errors.append(f"{name}: {type(e).__name__}: {e}")
                continue
            found[mod] = name
            return module
        raise ImportError(f"cannot import simpo-ray's {mod!r} module: " + "; ".join(errors))

    memory, loss, logps, parallel = load("memory"), load("loss"), load("logps"), load("parallel")
    model, step = load("model"), load("step")
    return types.SimpleNamespace(
        disable_dropout=model.disable_dropout, enable_checkpointing=model.enable_checkpointing,
        autocast=step.autocast, gradient_sync=step.gradient_sync, all_ranks=step.all_ranks,
        forward_backward=step.forward_backward, zero_grad=step.zero_grad,
        ModelShape=memory.ModelShape, Batch=memory.Batch, plan=memory.plan, GB=memory.GB,
        IGNORE_INDEX=loss.IGNORE_INDEX,
        PolicyLogps=logps.PolicyLogps, simpo_objective=logps.simpo_objective,
        shard=parallel.shard, clip_grad_norm=parallel.clip_grad_norm,
        modules=dict(found),
    )


# ------------------------------------------------------------------------------- settings

# Public Llama-3.2 configs (config.json on the Hub), the planner's REFERENCE_SHAPES rows. Rope
# scaling is left at the default: it changes the rotary table's values, not the work or memory.
SHAPES = {
    "1b": {"name": "Llama-3.2-1B", "num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 8192,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "3b": {"name": "Llama-3.2-3B", "num_hidden_layers": 28, "hidden_size": 3072, "intermediate_size": 8192,
           "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "tiny": {"name": "tiny-llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True},
}
STRATEGIES = ("fsdp", "ddp")
DEFAULT_SPACE = REPO / "search_spaces" / "1b-3b.yaml"
# Used for each key the space does not give (the 1b-3b space's values when this was written).
DEFAULT_BATCH = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 16, "max_length": 1024,
                 "max_prompt_length": 512, "gradient_checkpointing": True, "bf16": True}
DRY_RUN_BATCH = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_length": 32,
                 "max_prompt_length": 16}
# SimPO settings inside the 1b-3b space's ranges (beta 2-10, gamma_beta_ratio 0-1, instruct
# sft_weight 0.05-0.1, learning rate 3e-7 to 1e-6); they change the numbers, not the work.
OBJECTIVE = {"beta": 6.0, "gamma_beta_ratio": 0.5, "loss_type": "sigmoid", "label_smoothing": 0.0, "sft_weight": 0.1}
LEARNING_RATE = 1e-6
DRY_RUN_LEARNING_RATE = 1e-3  # big enough that the tiny model's loss visibly moves in 3 steps
MAX_GRAD_NORM = 1.0
# bf16 dense tensor-core peak, FLOP/s, by device name (NVIDIA data sheets; sparse figures are 2x).
# The first matching entry wins, so the more specific names come first.
PEAK_BF16_DENSE = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
                   ("A100", 312e12))
DEFAULT_PEAK_TFLOPS = 989.0


def read_space_batch(path: Path) -> tuple[dict, str]:
    """The batch settings of a search space's `base:` section, DEFAULT_BATCH for missing keys."""
    batch, note = dict(DEFAULT_BATCH), f"{path}"
    try:
        import yaml

        base = (yaml.safe_load(path.read_text()) or {}).get("base") or {}
    except (OSError, ImportError, ValueError) as e:
        return batch, f"defaults ({path} unreadable: {type(e).__name__})"
    missing = [k for k in DEFAULT_BATCH if k not in base]
    batch.update({k: base[k] for k in DEFAULT_BATCH if k in base})
    if missing:
        note += f" (defaults for {', '.join(missing)})"
    return batch, note


def peak_flops(device_name: str | None, override_tflops: float | None) -> tuple[float, str]:
    if override_tflops is not None:
        return override_tflops * 1e12, "--peak-tflops"
    for key, value in PEAK_BF16_DENSE:
        if device_name and key in device_name:
            return value, f"table entry {key!r}"
    return DEFAULT_PEAK_TFLOPS * 1e12, "default (device not in the table; set --peak-tflops)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(device) -> str:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=0, world_size=1, **kwargs)
    return backend


# ------------------------------------------------------------------------------- one arm

def _llama_config(shape: str, max_length: int):
    from transformers import LlamaConfig

    spec = {k: v for k, v in SHAPES[shape].items() if k != "name"}
    return LlamaConfig(max_position_embeddings=max(131072 if shape != "tiny" else 2048, max_length), **spec)


def _init_random_(module, std: float) -> None:
    """Random weights in place (HF's Llama init: normal(0, initializer_range), norms 1), on the
    local shards of FSDP's DTensors too. Replaces `parallel._fill_from_rank0` (no checkpoint)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.dim() == 1:
                local.fill_(1.0)
            else:
                local.normal_(0.0, std)


DDP_BUCKET_VIEW = True  # parallel.build_policy's DDP: gradient_as_bucket_view=True (--ddp-bucket-view)


def build(strategy: str, config, device, *, bf16: bool, checkpointing: bool):
    """(module to call, its parameter count): the project's two ways to build a worker's policy
    (`parallel.build_policy`), with random weights instead of a checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    P = _project()
    if strategy == "fsdp":
        # parallel._empty_model: the architecture on the meta device, buffers (rotary) real.
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.tie_weights()
    else:
        # parallel.build_policy("ddp"): model.load_model (fp32 weights even under bf16) on the
        # device; built there directly, as a CPU build of 3B random weights would take minutes.
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError("tie_word_embeddings is set but the head and the embedding are separate parameters")
    n_params = sum(p.numel() for p in model.parameters())
    P.disable_dropout(model)
    if checkpointing:
        P.enable_checkpointing(model)
    policy = P.PolicyLogps(model, compile=False)  # the eager step the trace counts
    if strategy == "fsdp":
        P.shard(policy, types.SimpleNamespace(bf16=bf16, fsdp_cpu_offload=False), device, 1)
    # The same seeded weights in both arms (same parameter order and shapes; world size 1, so a
    # shard is the whole tensor): their first losses must agree, which checks the FSDP arm's init.
    torch.manual_seed(0)
    _init_random_(policy, config.initializer_range)
    if strategy == "fsdp":
        return policy, n_params
    # ray.train.torch.prepare_model(..., parallel_strategy="ddp") on a multi-worker run: device_ids
    # and output_device on GPU, and the project's parallel_strategy_kwargs: gradient_as_bucket_view
    # (True since 2026-12-04; `--ddp-bucket-view off` measures DDP's default, False, as before).
    kwargs = {"device_ids": [device], "output_device": device} if device.type == "cuda" else {}
    return torch.nn.parallel.DistributedDataParallel(policy, gradient_as_bucket_view=DDP_BUCKET_VIEW,
                                                     **kwargs), n_params


def make_batches(vocab: int, micro: int, seq: int, prompt: int, accum: int, device, ignore: int) -> list[dict]:
    """`accum` micro-batches of `micro` random pairs, every sequence `seq` long: a shared prompt of
    `prompt` tokens (labels -100), then the response; each rejected sequence ends in seq/8 padding
    positions (attention mask 0, labels -100), so attention sees a padding mask as in real batches.
    The same micro-batches are used at every step (the loss should fall)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(1234)
    pad = seq // 8 if seq - prompt > seq // 8 else 0
    batches = []
    for _ in range(accum):
        prompt_ids = torch.randint(0, vocab, (micro, prompt), generator=g)
        fields = {}
        for side in ("chosen", "rejected"):
            ids = torch.cat([prompt_ids, torch.randint(0, vocab, (micro, seq - prompt), generator=g)], dim=1)
            mask = torch.ones_like(ids)
            labels = ids.clone()
            labels[:, :prompt] = ignore
            if side == "rejected" and pad:
                ids[:, seq - pad:] = 0
                mask[:, seq - pad:] = 0
                labels[:, seq - pad:] = ignore
            fields[f"{side}_input_ids"] = ids.to(device)
            fields[f"{side}_attention_mask"] = mask.to(device)
            fields[f"{side}_labels"] = labels.to(device)
        batches.append(fields)
    return batches


def train_steps(policy, strategy: str, batches: list[dict], device, *, bf16: bool, lr: float,
                steps: int, warmup: int, deadline: float) -> dict:
    """1 optimizer step = `len(batches)` micro-batches, as `loop.train_loop_per_worker` runs it."""
    import torch

    P = _project()
    cuda = device.type == "cuda"
    accum = len(batches)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)  # config default 0.0
    times, losses, norms, healthy = [], [], [], []
    for step in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step_loss = 0.0
        for micro, batch in enumerate(batches):
            # step.forward_backward: the loop's micro-batch (gradient sync on the last only)
            loss, metrics = P.forward_backward(policy, batch, types.SimpleNamespace(
                bf16=bf16, gradient_accumulation_steps=accum), OBJECTIVE, device, strategy, micro == accum - 1)
            # step.MetricWindow.add reads every metric to the host after each micro-batch.
            values = {name: float(v) for name, v in metrics.items()}
            step_loss += values["loss"] / accum
        norm = P.clip_grad_norm(policy, MAX_GRAD_NORM)
        # step.DivergenceCheck.healthy + all_ranks, on the last micro-batch's loss
        healthy.append(P.all_ranks(torch.isfinite(metrics["loss"]) & torch.isfinite(norm)))
        optimizer.step()
        P.zero_grad(optimizer, strategy)  # step.zero_grad: in place under DDP (bucket views), freed under FSDP
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(step_loss)
        norms.append(float(norm))
        if step >= warmup:
            times.append(dt)
            if time.perf_counter() + dt > deadline and step < warmup + steps - 1:
                print(f"    time budget: stopping after {len(times)} timed step(s)", file=sys.stderr, flush=True)
                break
        label = f"warm-up {step + 1}" if step < warmup else f"step {step + 1 - warmup}"
        print(f"    {label}: {dt:.2f} s, loss {step_loss:.4f}, grad norm {norms[-1]:.3g}", file=sys.stderr, flush=True)
    return {"step_times_s": times, "losses": losses, "grad_norms": norms, "healthy": all(healthy),
            "optimizer": optimizer}


GB_ = 1e9


def trace_arms(shapes: list[str], strategies: list[str], batch: dict) -> dict:
    """`train.trace.trace_step` of every arm (world 1, fake tensors on the CPU): the peak bytes the
    project's trace predicts for the step measured below. Its batch is the padded worst case
    (every position of every sequence a label), so it may exceed the measured peak slightly."""
    from simpo_ray.config import TrainConfig
    from simpo_ray.train.trace import trace_step

    out = {}
    for shape in shapes:
        config = _llama_config(shape, batch["max_length"])
        for strategy in strategies:
            cfg = TrainConfig(model_name_or_path="unused", parallel=strategy,
                              per_device_train_batch_size=batch["per_device_train_batch_size"],
                              gradient_accumulation_steps=batch["gradient_accumulation_steps"],
                              max_length=batch["max_length"], max_prompt_length=batch["max_prompt_length"],
                              bf16=bool(batch["bf16"]), gradient_checkpointing=bool(batch["gradient_checkpointing"]),
                              learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM, **OBJECTIVE)
            t = trace_step(cfg, config, world=1, strategy=strategy)
            out[shape, strategy] = t.peak
            print(f"  {shape} {strategy}: traced {t.peak / GB_:.2f} GB in {t.seconds:.0f} s ({t.phase})",
                  file=sys.stderr, flush=True)
    return out


def _plan(config, name: str, strategy: str, batch: dict, gpu: bool):
    """`memory.plan` for this shape and batch on one worker (`gpu=False`: no CUDA overhead)."""
    P = _project()
    shape = P.ModelShape.from_config(config, name)
    b = P.Batch(batch["per_device_train_batch_size"], batch["max_length"], bool(batch["bf16"]),
                bool(batch["gradient_checkpointing"]))
    return P.plan(shape, b, strategy=strategy, world=1, gpu=gpu)


def run_arm(shape: str, strategy: str, batch: dict, device, args, deadline: float) -> dict:
    import torch

    P = _project()
    cuda = device.type == "cuda"
    GB = P.GB
    micro, seq = batch["per_device_train_batch_size"], batch["max_length"]
    accum, prompt = batch["gradient_accumulation_steps"], min(batch["max_prompt_length"], batch["max_length"] // 2)
    bf16, ckpt = bool(batch["bf16"]), bool(batch["gradient_checkpointing"])
    config = _llama_config(shape, seq)
    plan = _plan(config, SHAPES[shape]["name"], strategy, batch, gpu=cuda)
    tokens_per_step = 2 * micro * seq * accum
    row = {"shape": shape, "model": SHAPES[shape]["name"], "strategy": strategy, "status": "ok",
           "micro_batch": micro, "seq_len": seq, "prompt_len": prompt, "grad_accum": accum,
           "bf16": bf16, "gradient_checkpointing": ckpt, "tokens_per_step": tokens_per_step,
           "plan_total_gb": plan.total / GB, "plan_parts_gb": {k: v / GB for k, v in plan.parts.items()},
           "plan_params_b": plan.shape.total_params / 1e9}
    t_arm = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
        row["allocated_before_gb"] = torch.cuda.memory_allocated() / GB
        torch.cuda.reset_peak_memory_stats()
    print(f"  {shape} {strategy}: building ({micro} x {seq} x {accum}, bf16={bf16}, checkpointing={ckpt})",
          file=sys.stderr, flush=True)
    policy = batches = result = None
    try:
        torch.manual_seed(0)
        policy, n_params = build(strategy, config, device, bf16=bf16, checkpointing=ckpt)
        row["params_b"] = n_params / 1e9
        batches = make_batches(config.vocab_size, micro, seq, prompt, accum, device, P.IGNORE_INDEX)
        if cuda:
            torch.cuda.synchronize()
            row["setup_allocated_gb"] = torch.cuda.memory_allocated() / GB
            row["setup_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GB
            torch.cuda.reset_peak_memory_stats()  # the step's peak, not the build's
        row["setup_s"] = time.perf_counter() - t_arm
        result = train_steps(policy, strategy, batches, device, bf16=bf16, lr=args.lr, steps=args.steps,
                             warmup=args.warmup, deadline=deadline)
        if cuda:
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            row["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GB
            row["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GB
            row["non_torch_gb"] = max(0.0, (total - free) - torch.cuda.memory_reserved()) / GB
            row["device_peak_gb"] = row["peak_reserved_gb"] + row["non_torch_gb"]
            row["alloc_over_plan_wo_overhead"] = row["peak_allocated_gb"] / (
                (plan.total - plan.parts["overhead"]) / GB)
            row["device_over_plan"] = row["device_peak_gb"] / row["plan_total_gb"]
        times = result.pop("step_times_s")
        optimizer = result.pop("optimizer")
        row.update(result)
        row["step_times_s"] = times
        row["step_s"] = statistics.median(times)
        row["tokens_per_s"] = tokens_per_step / row["step_s"]
        if cuda:
            row["mfu"] = 6 * n_params * tokens_per_step / row["step_s"] / args.peak_flops
        del optimizer
    except Exception as e:  # noqa: BLE001  an arm's failure is a row; the next arm still runs
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        row["status"] = "oom" if oom else "error"
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if cuda:
            row["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GB
            row["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GB
        if not oom:
            import traceback

            traceback.print_exc()
    finally:
        del policy, batches, result
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            row["allocated_after_gb"] = torch.cuda.memory_allocated() / GB
            torch.cuda.reset_peak_memory_stats()
    row["elapsed_s"] = time.perf_counter() - t_arm
    return row


# ------------------------------------------------------------------------------- output

COLUMNS = ["shape", "strategy", "params (B)", "micro x seq x accum", "peak alloc GB", "peak reserved GB",
           "non-torch GB", "plan GB", "plan parts GB (state / gather / act / logps chunk / overhead)",
           "alloc / plan w/o overhead", "traced GB", "alloc / trace", "device / plan", "step s", "tokens/s", "MFU", "loss first -> last",
           "elapsed s"]


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.{digits}g}"


def format_row(r: dict, cuda: bool) -> str:
    na = "n/a (cpu)"
    if r["status"] == "skipped":
        cells = [r["model"], r["strategy"], "skipped (time budget)"] + [""] * (len(COLUMNS) - 3)
        return "| " + " | ".join(cells) + " |"
    parts = r["plan_parts_gb"]
    state = parts["weights"] + parts["grads"] + parts["optimizer"]
    plan_parts = " / ".join(_num(v) for v in (state, parts["gather_buffers"], parts["activations"],
                                               parts["logps_chunk"], parts["overhead"]))
    batch = f"{r['micro_batch']} x {r['seq_len']} x {r['grad_accum']}"
    if r["status"] != "ok":
        if r["status"] == "oom":
            asked = re.search(r"Tried to allocate [0-9.]+ [KMGT]?i?B", r["error"])
            what = f"OOM at {_num(r.get('peak_allocated_gb'))} GB allocated" + (f" ({asked.group(0)})" if asked else "")
        else:
            what = f"error: {r['error']}".replace("|", "/")
        cells = [r["model"], r["strategy"], _num(r.get("params_b")), batch, _num(r.get("peak_allocated_gb")),
                 _num(r.get("peak_reserved_gb")), "", _num(r["plan_total_gb"]), plan_parts, what,
                 _num(r.get("trace_gb")), "", "", "", "", "", "", _num(r["elapsed_s"])]
        return "| " + " | ".join(cells) + " |"
    mem = (lambda key: _num(r.get(key))) if cuda else (lambda key: na)
    losses = r["losses"]
    cells = [r["model"], r["strategy"], _num(r["params_b"]), batch, mem("peak_allocated_gb"), mem("peak_reserved_gb"),
             mem("non_torch_gb"), _num(r["plan_total_gb"]), plan_parts, mem("alloc_over_plan_wo_overhead"),
             _num(r.get("trace_gb")), mem("alloc_over_trace"), mem("device_over_plan"), _num(r["step_s"]), _num(r["tokens_per_s"]),
             f"{r['mfu']:.1%}" if cuda else na, f"{losses[0]:.4f} -> {losses[-1]:.4f}", _num(r["elapsed_s"])]
    return "| " + " | ".join(cells) + " |"


def header(device, args, batch: dict, space_note: str, backend: str) -> dict:
    import torch
    import transformers

    cuda = device.type == "cuda"
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),  # noqa: UP017 (< 3.11)
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "device_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "backend": backend, "world_size": 1,
        "peak_flops": args.peak_flops if cuda else None, "peak_flops_source": args.peak_source if cuda else None,
        "space": space_note, "batch": batch, "objective": OBJECTIVE, "learning_rate": args.lr,
        "max_grad_norm": MAX_GRAD_NORM, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "dry_run": args.dry_run, "project_modules": _project().modules,
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    return info


def print_header(info: dict) -> None:
    dev = info["device"] + (f" ({info['device_memory_gib']:.0f} GiB)" if info["device_memory_gib"] else "")
    peak = (f"peak bf16 dense {info['peak_flops'] / 1e12:.0f} TFLOP/s ({info['peak_flops_source']})"
            if info["peak_flops"] else "MFU n/a on cpu")
    print(f"**{dev}**, torch {info['torch']}, transformers {info['transformers']}, CUDA {info['cuda'] or 'none'}, "
          f"{info['date_utc']}; {info['backend']} world size 1; {peak}")
    b = info["batch"]
    print(f"Batch from {info['space']}: micro-batch {b['per_device_train_batch_size']} pairs "
          f"(x2 sequences concatenated), max_length {b['max_length']} (prompt {b['max_prompt_length']}), "
          f"accumulation {b['gradient_accumulation_steps']}, bf16 {b['bf16']}, gradient checkpointing "
          f"{b['gradient_checkpointing']}; {info['warmup_steps']} warm-up + {info['timed_steps']} timed steps; "
          f"lr {info['learning_rate']:g}, SimPO beta {OBJECTIVE['beta']}, gamma/beta {OBJECTIVE['gamma_beta_ratio']}, "
          f"sft_weight {OBJECTIVE['sft_weight']}. Project modules: "
          + ", ".join(f"{k} from {v}" for k, v in info["project_modules"].items()))
    print("MFU = 6 x params x tokens per step / step time / peak (tokens: all positions of the concatenated "
          "batch x accumulation); non-torch GB = device used - reserved (CUDA context, NCCL, workspaces); "
          "device = peak reserved + non-torch.")
    print()
    print(table_head(), flush=True)


def table_head() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n" + "|" + "---|" * len(COLUMNS)


def write_json(path: str | None, info: dict, rows: list[dict]) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"header": info, "rows": rows}, indent=1, default=str))
    tmp.replace(out)


# ------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny Llama on the CPU (gloo): the same code, < 1 min")
    p.add_argument("--shapes", default=None, help="comma list of 1b, 3b (default: both; tiny with --dry-run)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma list of fsdp, ddp")
    p.add_argument("--steps", type=int, default=None,
                   help="timed optimizer steps per arm (default 3; 2 with --dry-run)")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (default 1)")
    p.add_argument("--space", default=str(DEFAULT_SPACE), help="search space whose base: gives the batch")
    p.add_argument("--micro-batch", type=int, default=None, help="override per_device_train_batch_size")
    p.add_argument("--grad-accum", type=int, default=None, help="override gradient_accumulation_steps")
    p.add_argument("--max-length", type=int, default=None, help="override max_length")
    p.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate (default {LEARNING_RATE:g}; {DRY_RUN_LEARNING_RATE:g} with --dry-run)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak bf16 dense TFLOP/s for MFU (default: by device name, else {DEFAULT_PEAK_TFLOPS:g})")
    p.add_argument("--time-budget", type=float, default=300.0,
                   help="seconds: no arm starts after this, and an arm stops timing steps near it (default 300)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    p.add_argument("--no-trace", action="store_true",
                   help="skip the fake-tensor trace of each arm (train.trace, on the CPU, before the arms)")
    p.add_argument("--ddp-bucket-view", choices=("on", "off"), default="on",
                   help="DDP's gradient_as_bucket_view (on: as the project builds DDP; off: DDP's default)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device; run with --dry-run on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    args.steps = args.steps if args.steps is not None else (2 if args.dry_run else 3)
    args.lr = args.lr if args.lr is not None else (DRY_RUN_LEARNING_RATE if args.dry_run else LEARNING_RATE)
    args.peak_flops, args.peak_source = peak_flops(torch.cuda.get_device_name(device) if cuda else None,
                                                   args.peak_tflops)
    batch, space_note = read_space_batch(Path(args.space))
    if args.dry_run:
        batch.update(DRY_RUN_BATCH)
        space_note += " (sizes replaced by --dry-run's)"
    for key, value in (("per_device_train_batch_size", args.micro_batch),
                       ("gradient_accumulation_steps", args.grad_accum), ("max_length", args.max_length)):
        if value is not None:
            batch[key] = value
    global DDP_BUCKET_VIEW
    DDP_BUCKET_VIEW = args.ddp_bucket_view == "on"
    shapes = [s.strip() for s in (args.shapes or ("tiny" if args.dry_run else "1b,3b")).split(",") if s.strip()]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES] + [s for s in strategies if s not in STRATEGIES]
    if unknown:
        p.error(f"unknown shape/strategy: {', '.join(unknown)} (shapes: {', '.join(SHAPES)}; "
                f"strategies: {', '.join(STRATEGIES)})")

    import transformers

    transformers.utils.logging.set_verbosity_error()
    _project()  # fail before the process group if the project's modules cannot be imported
    traces = {} if args.no_trace else trace_arms(shapes, strategies, batch)
    backend = _init_process_group(device)
    rows: list[dict] = []
    failed = False
    try:
        info = header(device, args, batch, space_note, backend)
        print_header(info)
        deadline = t_start + args.time_budget
        for shape in shapes:
            for strategy in strategies:
                if time.perf_counter() > deadline:
                    print(f"  {shape} {strategy}: skipped (time budget of {args.time_budget:g} s spent)",
                          file=sys.stderr, flush=True)
                    rows.append({"shape": shape, "model": SHAPES[shape]["name"], "strategy": strategy,
                                 "status": "skipped"})
                    print(format_row(rows[-1], cuda), flush=True)
                    continue
                row = run_arm(shape, strategy, batch, device, args, deadline)
                if (shape, strategy) in traces:
                    row["trace_gb"] = traces[shape, strategy] / GB_
                    if row.get("peak_allocated_gb"):
                        row["alloc_over_trace"] = row["peak_allocated_gb"] / row["trace_gb"]
                rows.append(row)
                failed |= row["status"] == "error"
                print(format_row(row, cuda), flush=True)
                print(f"  {shape} {strategy}: {row['status']} in {row['elapsed_s']:.1f} s "
                      f"(total {time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
                write_json(args.out, info, rows)  # after every arm: a killed run keeps what it measured
        info["total_s"] = time.perf_counter() - t_start
        write_json(args.out, info, rows)
        # The rows again as one block (above, the progress lines on stderr may interleave with them).
        print(f"\nTotal {info['total_s']:.0f} s. The table in one piece:\n\n{table_head()}")
        print("\n".join(format_row(r, cuda) for r in rows), flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
