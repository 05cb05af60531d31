"""The memory plan beside the traced step for every real space: per-GPU GB, both strategies.

For each GPU space in search_spaces/ (its base config and resources), and each strategy its
`parallel` setting can use (both for `auto`), it prints the planner's total (`memory.plan`,
without the CUDA-overhead term the trace cannot see), the traced peak of the workers' own step
under fake tensors and a fake process group of the trial's world size (`train.trace`, the
code behind `python -m simpo_ray.tune --space X --dry-run --trace-memory`), their ratio, and
whether each fits 90% of the space's gpu_memory_gb with the overhead added. CPU only; about a
minute per row on 2 cores, no storage.

    python bench/memory_trace.py                      # all real spaces
    python bench/memory_trace.py --spaces 7b 70b
"""

from __future__ import annotations

import sys

from _common import REPO, load, machine, parser, table, write_json

SPACES = ("1b-3b", "7b", "8b-13b", "13b-30b", "70b")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, "memory_trace")
    p.add_argument("--spaces", nargs="+", default=list(SPACES))
    args = p.parse_args(argv)

    from simpo_ray.search.plan import load as load_space
    from simpo_ray.train import memory
    from simpo_ray.train.trace import trace_run

    info = machine()
    rows, out = [], []
    for name in args.spaces:
        space = load_space(REPO / "search_spaces" / f"{name}.yaml")
        res = space.resources
        load_before = load()
        run = trace_run(space.default_config(), res, space.estimate.params_billion if space.estimate else None)
        for tr, plan in zip(run.traces, run.plans):
            planned = plan.total - plan.parts["overhead"]
            fits = tr.peak + memory.GPU_OVERHEAD_BYTES <= memory.FIT_MARGIN * res.gpu_memory_gb * memory.GB
            row = {"space": name, "model": run.source, "strategy": tr.strategy, "world": res.num_workers,
                   "plan_gb": planned / 1e9, "trace_gb": tr.peak / 1e9, "plan_over_trace": planned / tr.peak,
                   "fits": fits, "gpu_memory_gb": res.gpu_memory_gb,
                   "plan_parts_gb": {k: v / 1e9 for k, v in plan.parts.items()},
                   "trace_parts_gb": {k: v / 1e9 for k, v in tr.parts.items()},
                   "trace_s": tr.seconds, "ops": tr.ops, "load": [load_before, load()]}
            out.append(row)
            rows.append([name, tr.strategy, res.num_workers, f"{planned / 1e9:.1f}", f"{tr.peak / 1e9:.1f}",
                         f"{planned / tr.peak:.2f}", "yes" if fits else "NO",
                         " / ".join(f"{tr.parts[k] / 1e9:.1f}" for k in
                                    ("parameters", "gradients", "optimizer", "reward_model", "other")),
                         f"{tr.seconds:.0f}", f"{load_before:.2f}"])
            print(f"  {name} {tr.strategy}: plan {planned / 1e9:.1f} GB, trace {tr.peak / 1e9:.1f} GB "
                  f"({tr.seconds:.0f} s)", file=sys.stderr, flush=True)
    print(f"# memory plan vs traced step ({info['date_utc']}, torch {info['torch']}, load at start "
          f"{info['load_at_start']})\n")
    print(table(["space", "strategy", "GPUs", "plan GB", "traced GB", "plan/trace", "fits 90%",
                 "trace: params / grads / AdamW / reward / other GB", "trace s", "load"], rows))
    write_json(args.out, {"machine": info, "rows": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
