"""Per-worker memory and step time of one SimPO training step: DDP vs FSDP2, 2 workers (gloo, CPU).

Both sides are simpo-ray's own code paths: DDP wraps `PolicyLogps(load_model(cfg))` in
`DistributedDataParallel` (what Ray Train's `prepare_model` does on CPU); FSDP is
`parallel.build_policy(cfg, "fsdp", ...)` (meta-device build, `fully_shard` per decoder layer then
the root, weights broadcast from rank 0). Each (model, strategy) runs in a fresh pair of
processes, so `ru_maxrss` belongs to that run. Reported per worker (rank 0): the bytes it holds of
parameters and AdamW state (`parallel.local_bytes`), the peak RSS minus the RSS before the model
was built (what the model, its state and the steps add), and the median step time (process CPU
time, 1 thread). The memory planner's estimate for the same shape is printed beside it.

Usage: .venv/bin/python bench/fsdp_vs_ddp.py [--steps 10] [--models base,vocab128k]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load, machine, parser, table, write_json  # noqa: E402
from _common import peak_mb as _peak_mb, rss_mb as _rss_mb  # noqa: E402

WORLD = 2



def _model_dir(name: str, root: Path) -> Path:
    """A saved model (random weights: timing and memory do not depend on them) + bundled tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_ray.bundled import models
    from simpo_ray.bundled.tokenizer import build_tokenizer

    path = root / name
    if name == "vocab128k":
        config = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    else:
        config = LlamaConfig(vocab_size=len(models.SPECIALS) + len(models.CHARS), tie_word_embeddings=True,
                             **models.LADDER[name]["config"])
    LlamaForCausalLM(config).save_pretrained(path)
    build_tokenizer(path)
    return path


def _worker(rank: int, strategy: str, model_dir: str, steps: int, micro: int, seq: int, init: str, out: str):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    from simpo_ray.train import parallel
    from simpo_ray.config import TrainConfig
    from simpo_ray.train.logps import PolicyLogps, simpo_objective
    from simpo_ray.train.model import load_model

    cfg = TrainConfig(model_name_or_path=model_dir, parallel=strategy, max_length=seq, max_prompt_length=seq // 2)
    base_rss = _rss_mb()
    if strategy == "ddp":
        policy = torch.nn.parallel.DistributedDataParallel(PolicyLogps(load_model(cfg)))
    else:
        policy, _ = parallel.build_policy(cfg, "fsdp", torch.device("cpu"), rank, WORLD)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    vocab = (policy.module if strategy == "ddp" else policy).model.config.vocab_size
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, vocab, (micro, seq), generator=gen)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    mask = torch.ones_like(ids)
    cpu_times = []
    for i in range(steps + 2):
        c0 = time.process_time()
        logps = policy(ids, mask, labels, ids.flip(1), mask, labels.flip(1))
        loss, _ = simpo_objective(logps, beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.5)
        loss.backward()
        parallel.clip_grad_norm(policy, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:  # the first steps create the AdamW state and warm the allocator
            cpu_times.append(time.process_time() - c0)
    sizes = parallel.local_bytes(policy, optimizer)
    result = {"rank": rank, "strategy": strategy, "cpu_s_per_step": sorted(cpu_times)[len(cpu_times) // 2],
              "peak_minus_base_mb": _peak_mb() - base_rss, "param_mb": sizes["param_bytes"] / 2**20,
              "optimizer_mb": sizes["optimizer_bytes"] / 2**20}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def run(strategy: str, model_dir: Path, steps: int, micro: int, seq: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/result.json"
        mp.spawn(_worker, args=(strategy, str(model_dir), steps, micro, seq, f"file://{tmp}/store", out),
                 nprocs=WORLD)
        return json.loads(Path(out).read_text())


def planned_mb(model_dir: Path, strategy: str, micro: int, seq: int) -> float:
    from transformers import AutoConfig

    from simpo_ray.train.memory import Batch, ModelShape, plan

    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir), "bench")
    p = plan(shape, Batch(micro, seq, False, False), strategy=strategy, world=WORLD, gpu=False)
    return (p.total) / 2**20


def main(argv=None) -> int:
    p = parser(__doc__, "fsdp_vs_ddp")
    p.add_argument("--models", default="base,vocab128k", help="comma list: tiny, small, base, vocab128k")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per worker per step")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    info = machine()
    rows, runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            model_dir = _model_dir(name, Path(tmp))
            res = {}
            for strategy in ("ddp", "fsdp"):
                load_before = load()
                res[strategy] = {**run(strategy, model_dir, args.steps, args.micro_batch, args.seq),
                                 "load_before": load_before, "load_after": load(),
                                 "planned_mb": planned_mb(model_dir, strategy, args.micro_batch, args.seq)}
                runs.append({"model": name, **res[strategy]})
                print(f"  {name} {strategy}: {res[strategy]}", file=sys.stderr, flush=True)
            d, f = res["ddp"], res["fsdp"]
            rows.append([name, d["param_mb"] + d["optimizer_mb"], f["param_mb"] + f["optimizer_mb"],
                         (f["param_mb"] + f["optimizer_mb"]) / (d["param_mb"] + d["optimizer_mb"]),
                         d["peak_minus_base_mb"], f["peak_minus_base_mb"],
                         f["peak_minus_base_mb"] / d["peak_minus_base_mb"], d["planned_mb"], f["planned_mb"],
                         d["cpu_s_per_step"], f["cpu_s_per_step"], f["cpu_s_per_step"] / d["cpu_s_per_step"],
                         f"{min(r['load_before'] for r in res.values()):.1f}-"
                         f"{max(r['load_after'] for r in res.values()):.1f}"])
    headers = ["model", "DDP params+AdamW MB/worker", "FSDP params+AdamW MB/worker", "FSDP/DDP state",
               "DDP peak-base MB", "FSDP peak-base MB", "FSDP/DDP peak", "planned DDP MB", "planned FSDP MB",
               "DDP CPU s/step", "FSDP CPU s/step", "FSDP/DDP time", "load (1 min)"]
    md = table(headers, rows)
    print(f"\nDDP vs FSDP2, {WORLD} workers x 1 thread, fp32, micro-batch {args.micro_batch} pairs x "
          f"{args.seq} tokens, CPU ({info['cpu_model']}, {info['cores']} cores), {info['date_utc']}")
    print(md)
    out = write_json(args.out, {"benchmark": "fsdp_vs_ddp", "machine": info, "settings": vars(args),
                                "runs": runs, "markdown": md})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
