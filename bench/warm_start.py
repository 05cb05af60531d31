"""Warm start across sizes vs a cold search, on the bundled ladder: does `bundled:base` reach the
cold search's best with fewer trials and fewer training steps when it starts from finished
`tiny` and `small` searches?

Runs (or reuses, with --sources) one cpu-tiny and one cpu-small search, then per seed one cold
cpu-base search and one warm-started from those two (`--warm-start`: the trend of each parameter
against model size predicts base's point, queued right after the documented default). Both arms
have the same space, trial count, scheduler (ASHA) and seed.

Per seed, the target is the cold search's best `eval/success_rate` less the objective's noise
(the binomial standard error of a rate near 0.5 on the 128 generation prompts, 0.044): the
compute an arm needed is the number of trials started (in Tune's trial order) and the training
steps summed over them until the first report reaching the target. An arm that never reaches it
counts its whole search. Prints a table per seed and the means, with the load average.

Usage: .venv/bin/python bench/warm_start.py [--seeds 0,1,2] [--sources TINY_DIR SMALL_DIR]
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, load, parser, write_json  # noqa: E402
import _search  # noqa: E402

OBJECTIVE = "eval/success_rate"
NOISE = math.sqrt(0.25 / 128)  # the standard error of a success rate near 0.5 on 128 prompts


def search(space: str, storage: Path, name: str, seed: int, warm: list[str] | None = None,
           num_samples: int | None = None) -> dict:
    from simpo_ray.tune import run_search

    t0 = time.perf_counter()
    exp = run_search(str(REPO / "search_spaces" / f"{space}.yaml"), storage_path=str(storage), name=name,
                     seed=seed, warm_start=warm, num_samples=num_samples, verbose=0)
    return {"exp": Path(exp), "wall_s": time.perf_counter() - t0, "load": load()}


def main() -> int:
    p = parser(__doc__, "warm_start")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sources", nargs=2, metavar=("TINY", "SMALL"), help="finished cpu-tiny and cpu-small searches")
    p.add_argument("--num-samples", type=int, default=None, help="trials per cpu-base search (default: the space's 12)")
    p.add_argument("--storage", default=str(REPO / "bench" / "results" / "searches"))
    args = p.parse_args()
    storage = Path(args.storage)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"load average {load()} at start", flush=True)
    if args.sources:
        sources = [str(Path(s).resolve()) for s in args.sources]
    else:
        sources = [str(search(s, storage, f"warm-source-{s}", 0)["exp"]) for s in ("cpu-tiny", "cpu-small")]
    rows = []
    for seed in seeds:
        cold = search("cpu-base", storage, f"base-cold-seed{seed}", seed, num_samples=args.num_samples)
        warm = search("cpu-base", storage, f"base-warm-seed{seed}", seed, warm=sources, num_samples=args.num_samples)
        best = pd.read_csv(cold["exp"] / "trials.csv")["best_objective"].max()
        target = best - NOISE
        row = {"seed": seed, "cold_best": float(best), "target": float(target),
               "warm_best": float(pd.read_csv(warm["exp"] / "trials.csv")["best_objective"].max())}
        for arm, run in (("cold", cold), ("warm", warm)):
            got = _search.compute_to_reach(run["exp"], target, OBJECTIVE)
            row.update({f"{arm}_{k}": v for k, v in got.items()})
            row[f"{arm}_wall_s"], row[f"{arm}_load"] = run["wall_s"], run["load"]
        rows.append(row)
        print(row, flush=True)
    df = pd.DataFrame(rows)
    print(f"\nsources: {', '.join(sources)}; noise allowance {NOISE:.3f}\n")
    print("| seed | cold best | warm best | target | cold: trials / steps to target | warm: trials / steps to target | steps cold/warm | load after cold / warm |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["cold_steps"] / max(r["warm_steps"], 1)
        print(f"| {r['seed']} | {r['cold_best']:.3f} | {r['warm_best']:.3f} | {r['target']:.3f} | "
              f"{r['cold_trials']} / {r['cold_steps']} | {r['warm_trials']} / {r['warm_steps']}"
              f"{'' if r['warm_reached'] else ' (not reached)'} | {ratio:.2f} | {r['cold_load']} / {r['warm_load']} |")
    print(f"\nmean steps to target: cold {df['cold_steps'].mean():.0f}, warm {df['warm_steps'].mean():.0f} "
          f"(cold/warm {df['cold_steps'].mean() / max(df['warm_steps'].mean(), 1):.2f}); mean trials: cold "
          f"{df['cold_trials'].mean():.1f}, warm {df['warm_trials'].mean():.1f}")
    write_json(args.out, {"rows": rows, "sources": sources, "noise": NOISE})
    return 0


if __name__ == "__main__":
    sys.exit(main())
