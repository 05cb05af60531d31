"""Warm start across sizes vs a cold search, on the bundled ladder: does `bundled:base` reach the
cold search's best with fewer trials and fewer training steps when it starts from finished
`tiny` and `small` searches?

Runs (or reuses, with --sources) one cpu-tiny and one cpu-small search, then per seed the arms,
all with the same space, budget, trial count, scheduler (ASHA) and seed:
- `cold`: the space as it is;
- `warm`: `--warm-start`, `search.warm_start_points: trend`: the trend of each parameter against
  model size predicts base's point, queued right after the documented default;
- `warm-topk`: `search.warm_start_points: top_k`: the 3 best trials of the nearest finished size
  (small) queued after the default instead (zero-shot transfer by rank);
- `warm-prior`: `search.warm_start_points: prior`: 3 points drawn (seeded by the search's seed)
  from a truncated normal per parameter around the trends' point (`transfer.prior`, piBO style);
- `warm-narrow`: `--warm-start --warm-start-narrow` (refused from two source sizes, which give no
  interval, so not among the default arms).
The trials are cheaper than the space's (`--steps`, default 300 of its 600, ASHA's grace period
a third of that; `--num-samples`, default 8) so that five seeds per arm fit the machine; the
source searches run at the same step budget (a size's best learning rate depends on it).
A search whose directory under --storage already holds a finished search of that name is
reused, not rerun. With --sources-per-seed each seed's warm arms start from tiny and small
searches run with that seed (the sources' cost is not counted: it is spent once per ladder).

Per seed, the target is the cold search's best `eval/success_rate` less the objective's noise
(the binomial standard error of a rate near 0.5 on the space's generation prompts): the compute
an arm needed is the number of trials started (in Tune's trial order) and the training steps
summed over them until the first report reaching the target. An arm that never reaches it
counts its whole search. Prints a table per seed, the means, and per arm in how many seeds it
needed at most half the cold search's trials (the issue's aim: 4 of 5), with the load average.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, load, parser, write_json  # noqa: E402
import _search  # noqa: E402

OBJECTIVE = "eval/success_rate"
ARMS = {"cold": {}, "warm": {"search.warm_start_points": "trend"},
        "warm-topk": {"search.warm_start_points": "top_k", "search.warm_start_top_k": 3},
        "warm-prior": {"search.warm_start_points": "prior", "search.warm_start_prior_samples": 3},
        "warm-narrow": {"search.warm_start_points": "trend", "search.warm_start_narrow": True}}


def budget(steps: int) -> dict:
    """The step budget of every search here: `steps` steps, evaluated (and judged by ASHA) every
    third of them."""
    third = steps // 3
    return {"base.max_steps": steps, "base.eval_steps": third, "search.max_t": steps,
            "search.grace_period": third}


def search(space: str, storage: Path, name: str, seed: int, overrides: dict, warm: list[str] | None = None,
           num_samples: int | None = None) -> dict:
    """One search, or the finished one already under `storage/name` (wall time and load then unknown)."""
    from simpo_ray.search.run import run_search

    record = storage / name / "search.json"
    if record.exists() and json.loads(record.read_text()).get("state") == "finished":
        print(f"reusing {storage / name}", flush=True)
        return {"exp": storage / name, "wall_s": float("nan"), "load": float("nan"), "reused": True}
    if (storage / name).exists():  # an interrupted run of this bench: start that arm again
        print(f"removing the unfinished {storage / name}", flush=True)
        shutil.rmtree(storage / name)
    t0 = time.perf_counter()
    exp = run_search(str(REPO / "search_spaces" / f"{space}.yaml"), storage_path=str(storage), name=name,
                     seed=seed, warm_start=warm, num_samples=num_samples, overrides=overrides, verbose=0)
    return {"exp": Path(exp), "wall_s": time.perf_counter() - t0, "load": load(), "reused": False}


def load_space_prompts() -> int:
    import yaml

    data = yaml.safe_load((REPO / "search_spaces" / "cpu-base.yaml").read_text())
    return int(data["base"]["generation_eval_samples"])


def main() -> int:
    p = parser(__doc__, "warm_start")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--arms", default="cold,warm,warm-topk",
                   help=f"comma list of {', '.join(ARMS)} (cold always runs)")
    p.add_argument("--sources", nargs=2, metavar=("TINY", "SMALL"), help="finished cpu-tiny and cpu-small searches")
    p.add_argument("--num-samples", type=int, default=8, help="trials per cpu-base search (default 8)")
    p.add_argument("--steps", type=int, default=300, help="training steps per trial, every search (default 300)")
    p.add_argument("--storage", default=str(REPO / "bench" / "results" / "searches"))
    p.add_argument("--sources-per-seed", action="store_true",
                   help="search cpu-tiny and cpu-small once per seed, with that seed (seed 0: the shared "
                        "sources), so that the warm arms' seeds differ in what they transfer too, not only in "
                        "their own search")
    args = p.parse_args()
    storage = Path(args.storage)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = ["cold"] + [a for a in args.arms.split(",") if a and a != "cold"]
    for a in arms:
        if a not in ARMS:
            p.error(f"--arms: unknown arm {a!r}; allowed: {', '.join(ARMS)}")
    steps = budget(args.steps)
    tag = f"s{args.steps}"
    prompts = load_space_prompts()
    noise = math.sqrt(0.25 / prompts)  # the standard error of a success rate near 0.5
    print(f"load average {load()} at start; {args.steps} steps per trial, {args.num_samples} trials per search, "
          f"noise allowance {noise:.3f} ({prompts} prompts)", flush=True)
    if args.sources:
        sources = [str(Path(s).resolve()) for s in args.sources]
        import hashlib

        tag += "-src" + hashlib.sha256("\n".join(sources).encode()).hexdigest()[:6]  # other sources: other arms
    else:
        sources = [str(search(s, storage, f"warm-source-{s}-{tag}", 0, steps)["exp"]) for s in ("cpu-tiny", "cpu-small")]
    if args.sources_per_seed and args.sources:
        p.error("--sources-per-seed runs its own sources: drop --sources")
    rows = []
    for seed in seeds:
        runs, warm_tag, seed_sources = {}, tag, sources
        if args.sources_per_seed and seed != 0:
            warm_tag = f"{tag}-ps"  # other sources: other warm searches (the cold one is the same)
            seed_sources = [str(search(s, storage, f"warm-source-{s}-{tag}-seed{seed}", seed, steps)["exp"])
                            for s in ("cpu-tiny", "cpu-small")]
        for arm in arms:
            name = f"base-{arm}-{tag if arm == 'cold' else warm_tag}-n{args.num_samples}-seed{seed}"
            runs[arm] = search("cpu-base", storage, name, seed, {**steps, **ARMS[arm]}, num_samples=args.num_samples,
                               warm=None if arm == "cold" else seed_sources)
        best = pd.read_csv(runs["cold"]["exp"] / "trials.csv")["best_objective"].max()
        target = best - noise
        row = {"seed": seed, "cold_best": float(best), "target": float(target), "sources": seed_sources}
        for arm, run in runs.items():
            row[f"{arm}_best"] = float(pd.read_csv(run["exp"] / "trials.csv")["best_objective"].max())
            got = _search.compute_to_reach(run["exp"], target, OBJECTIVE)
            row.update({f"{arm}_{k}": v for k, v in got.items()})
            row[f"{arm}_wall_s"], row[f"{arm}_load"] = run["wall_s"], run["load"]
        rows.append(row)
        print(row, flush=True)
    df = pd.DataFrame(rows)
    print(f"\nsources: {', '.join(sources)}; noise allowance {noise:.3f}; load average {load()} at end\n")
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
    for a in arms[1:]:
        half = sum(r[f"{a}_reached"] and 2 * r[f"{a}_trials"] <= r["cold_trials"] for r in rows)
        ratio = df["cold_trials"].sum() / df[f"{a}_trials"].sum()
        steps_ratio = df["cold_steps"].sum() / df[f"{a}_steps"].sum()
        print(f"{a}: at most half the cold trials in {half} of {len(rows)} seeds; trials cold / {a} "
              f"{ratio:.2f}x, steps {steps_ratio:.2f}x (summed over seeds)")
    write_json(args.out, {"rows": rows, "arms": arms, "sources": sources, "noise": noise, "steps": args.steps,
                          "num_samples": args.num_samples})
    return 0


if __name__ == "__main__":
    sys.exit(main())
