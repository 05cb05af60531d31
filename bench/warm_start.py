"""Warm start across sizes vs a cold search, on the bundled ladder: does `bundled:base` reach the
cold search's best with fewer trials and fewer training steps when it starts from finished
`tiny` and `small` searches?

Runs (or reuses, with --sources) one cpu-tiny and one cpu-small search, then per seed the arms:
`cold` (the space as it is), `warm` (`--warm-start`: the trend of each parameter against model
size predicts base's point, queued right after the documented default) and `warm-narrow`
(`--warm-start --warm-start-narrow`: the search ranges narrowed to the predicted intervals too;
refused from two source sizes, which give no interval, so not among the default arms).
All arms have the same space, trial count, scheduler (ASHA) and seed. A search whose directory
under --storage already holds a finished search of that name is reused, not rerun.

Per seed, the target is the cold search's best `eval/success_rate` less the objective's noise
(the binomial standard error of a rate near 0.5 on the 128 generation prompts, 0.044): the
compute an arm needed is the number of trials started (in Tune's trial order) and the training
steps summed over them until the first report reaching the target. An arm that never reaches it
counts its whole search. Prints a table per seed and the means, with the load average.

Usage: .venv/bin/python bench/warm_start.py [--seeds 0,1,2] [--arms cold,warm]
           [--sources TINY_DIR SMALL_DIR] [--num-samples N]
"""

from __future__ import annotations

import json
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
           num_samples: int | None = None, narrow: bool = False) -> dict:
    """One search, or the finished one already under `storage/name` (wall time and load then unknown)."""
    from simpo_ray.search.run import run_search

    record = storage / name / "search.json"
    if record.exists() and json.loads(record.read_text()).get("state") == "finished":
        print(f"reusing {storage / name}", flush=True)
        return {"exp": storage / name, "wall_s": float("nan"), "load": float("nan"), "reused": True}
    t0 = time.perf_counter()
    exp = run_search(str(REPO / "search_spaces" / f"{space}.yaml"), storage_path=str(storage), name=name,
                     seed=seed, warm_start=warm, warm_start_narrow=narrow or None, num_samples=num_samples,
                     verbose=0)
    return {"exp": Path(exp), "wall_s": time.perf_counter() - t0, "load": load(), "reused": False}


def main() -> int:
    p = parser(__doc__, "warm_start")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default="cold,warm", help="comma list of cold, warm, warm-narrow (cold always runs)")
    p.add_argument("--sources", nargs=2, metavar=("TINY", "SMALL"), help="finished cpu-tiny and cpu-small searches")
    p.add_argument("--num-samples", type=int, default=None, help="trials per cpu-base search (default: the space's 12)")
    p.add_argument("--storage", default=str(REPO / "bench" / "results" / "searches"))
    args = p.parse_args()
    storage = Path(args.storage)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = ["cold"] + [a for a in args.arms.split(",") if a and a != "cold"]
    for a in arms:
        if a not in ("cold", "warm", "warm-narrow"):
            p.error(f"--arms: unknown arm {a!r}; allowed: cold, warm, warm-narrow")
    print(f"load average {load()} at start", flush=True)
    if args.sources:
        sources = [str(Path(s).resolve()) for s in args.sources]
    else:
        sources = [str(search(s, storage, f"warm-source-{s}", 0)["exp"]) for s in ("cpu-tiny", "cpu-small")]
    rows = []
    for seed in seeds:
        runs = {}
        for arm in arms:
            name = f"base-{arm}-seed{seed}"
            runs[arm] = search("cpu-base", storage, name, seed, num_samples=args.num_samples,
                               warm=None if arm == "cold" else sources, narrow=arm == "warm-narrow")
        best = pd.read_csv(runs["cold"]["exp"] / "trials.csv")["best_objective"].max()
        target = best - NOISE
        row = {"seed": seed, "cold_best": float(best), "target": float(target)}
        for arm, run in runs.items():
            row[f"{arm}_best"] = float(pd.read_csv(run["exp"] / "trials.csv")["best_objective"].max())
            got = _search.compute_to_reach(run["exp"], target, OBJECTIVE)
            row.update({f"{arm}_{k}": v for k, v in got.items()})
            row[f"{arm}_wall_s"], row[f"{arm}_load"] = run["wall_s"], run["load"]
        rows.append(row)
        print(row, flush=True)
    df = pd.DataFrame(rows)
    print(f"\nsources: {', '.join(sources)}; noise allowance {NOISE:.3f}\n")
    print("| seed | target | " + " | ".join(f"{a}: best / trials / steps to target" for a in arms) + " | "
          + " | ".join(f"steps cold / {a}" for a in arms if a != "cold") + " |")
    print("|---|---|" + "---|" * (2 * len(arms) - 1))
    for r in rows:
        cells = [f"{r[f'{a}_best']:.3f} / {r[f'{a}_trials']} / {r[f'{a}_steps']}"
                 f"{'' if r[f'{a}_reached'] else ' (not reached)'}" for a in arms]
        ratios = [f"{r['cold_steps'] / max(r[f'{a}_steps'], 1):.2f}" for a in arms if a != "cold"]
        print(f"| {r['seed']} | {r['target']:.3f} | " + " | ".join(cells + ratios) + " |")
    means = ", ".join(f"{a} {df[f'{a}_steps'].mean():.0f} steps / {df[f'{a}_trials'].mean():.1f} trials "
                      f"(reached {int(df[f'{a}_reached'].sum())}/{len(df)})" for a in arms)
    print(f"\nmeans to target: {means}")
    write_json(args.out, {"rows": rows, "arms": arms, "sources": sources, "noise": NOISE})
    return 0


if __name__ == "__main__":
    sys.exit(main())
