"""Compute to the best config: which levers reach FIFO + random search's best success rate with
the least summed training compute? On the bundled cpu-tiny space, same trial count, seeds and
step budget in every arm.

Arms (each a search of the cpu-tiny space; `--arms` picks them, `--list-arms` prints them):
  fifo+random       the baseline: every trial runs 600 steps, Optuna's RandomSampler
  fifo+tpe          TPE alone
  asha+tpe          the space's own search: ASHA grace 200, reduction 3 (rungs 200, 600)
  asha+tpe/512      the same, evaluating on all 512 held-out prompts (noise /2) instead of 128
  asha-early+tpe    more and earlier rungs: grace 100, reduction 2 (rungs 100, 200, 400)
  hyperband+tpe     asynchronous HyperBand (`scheduler: hyperband`): ASHA over brackets with first
                    cuts at 200 and at 600 (none), trials placed 73% / 27%
  asha+tpe-indep    independent TPE (search.tpe_multivariate: false; Optuna 5's default, as
                    in every other TPE arm, models the parameters jointly)
  asha+tpe-startup2 TPE's model from the 3rd trial (search.tpe_startup_trials: 2, not 4)
  asha+tpe/warm     warm-started from finished cpu-small and cpu-base searches (--warm-sources):
                    the size trend predicts tiny's point, queued after the default

The target is FIFO + random's best, averaged over seeds, less the objective's noise there (the
binomial standard error at that rate on 128 prompts). Per search: the trials started and the
training steps summed over them, in Tune's trial order, until the first report reaching the
target (`_search.compute_to_reach`; a search that never reaches it counts all its steps and is
marked); the same for a fixed bar (`--bar`, default success 0.5, a clear gain over the SFT
model's 0.28); the whole search's steps, summed train-step seconds and wall time; its best
`eval/success_rate`. The table gives each arm's mean over seeds and the ratio of FIFO + random's
mean to the arm's. All searches run in one process on one Ray cluster, seeds in the outer loop
so drifting load hits every arm alike; `--resume` keeps the runs already in `--out` and runs
only the missing (arm, seed) pairs; `--summarise-only` prints the table again from `--out`.

Usage: .venv/bin/python bench/early_stopping.py [--arms A,B,...] [--seeds 0,1,2]
           [--warm-sources SMALL_DIR BASE_DIR] [--resume] [--summarise-only] [--quick]
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, load, machine, mean_sd, table, write_json  # noqa: E402

OBJECTIVE = "eval/success_rate"
BASELINE = "fifo+random"
ALL_PROMPTS = {"base.generation_eval_samples": 512, "base.max_eval_samples": 512}
ARMS = {
    "fifo+random": {"scheduler": "fifo", "sampler": "random", "lever": "baseline"},
    "fifo+tpe": {"scheduler": "fifo", "sampler": "tpe", "lever": "TPE"},
    "asha+random": {"scheduler": "asha", "sampler": "random", "lever": "ASHA"},
    "asha+tpe": {"scheduler": "asha", "sampler": "tpe", "lever": "ASHA + TPE (the space's search)"},
    "asha+tpe/512": {"scheduler": "asha", "sampler": "tpe", "extra": ALL_PROMPTS,
                     "lever": "+ 512 eval prompts"},
    "asha-early+tpe": {"scheduler": "asha", "sampler": "tpe",
                       "extra": {"search.grace_period": 100, "search.reduction_factor": 2},
                       "lever": "+ earlier, more rungs (100/200/400)"},
    "hyperband+tpe": {"scheduler": "hyperband", "sampler": "tpe", "lever": "async HyperBand brackets"},
    "asha+tpe-indep": {"scheduler": "asha", "sampler": "tpe", "extra": {"search.tpe_multivariate": False},
                       "lever": "independent TPE (not joint)"},
    "asha+tpe-startup2": {"scheduler": "asha", "sampler": "tpe", "extra": {"search.tpe_startup_trials": 2},
                          "lever": "+ TPE model from trial 3 (2 start-up, not 4)"},
    "asha+tpe/warm": {"scheduler": "asha", "sampler": "tpe", "warm": True, "lever": "+ warm start from small, base"},
}


def noise(p: float, prompts: int = 128) -> float:
    """The binomial standard error of a success rate p measured on `prompts` prompts."""
    return math.sqrt(max(p * (1 - p), 1e-9) / prompts)


def main(argv=None) -> int:
    p = parser(__doc__, "early_stopping")
    p.add_argument("--quick", action="store_true", help="smoke check: 1 seed, 3 trials x 40 steps")
    p.add_argument("--list-arms", action="store_true", help="print the arms and exit")
    p.add_argument("--arms", default="fifo+random,asha+tpe,asha+tpe/512,asha-early+tpe,hyperband+tpe,asha+tpe-indep,asha+tpe-startup2",
                   help="comma list of arms")
    p.add_argument("--seeds", default="0,1,2", help="search seeds (sampler seed)")
    p.add_argument("--num-samples", type=int, default=12, help="trials per search")
    p.add_argument("--max-steps", type=int, default=600, help="steps of a trial that runs to the end")
    p.add_argument("--warm-sources", nargs="+", metavar="DIR", help="finished searches of other sizes, for asha+tpe/warm")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out, run the missing ones")
    p.add_argument("--bar", type=float, default=0.5, help="a fixed success rate to reach too (default 0.5)")
    p.add_argument("--summarise-only", action="store_true", help="print the table of the runs in --out, run nothing")
    args = p.parse_args(argv)
    if args.list_arms:
        for name, arm in ARMS.items():
            print(f"{name:16s} {arm['lever']}")
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for a in arms:
        if a not in ARMS:
            p.error(f"--arms: unknown arm {a!r}; allowed: {', '.join(ARMS)}")
        if ARMS[a].get("warm") and not args.warm_sources:
            p.error(f"--arms: {a} needs --warm-sources (finished searches of other bundled sizes)")
    seeds = [int(s) for s in args.seeds.split(",")]
    base_extra = {"search.max_t": args.max_steps}
    if args.quick:
        seeds, args.num_samples, args.max_steps = seeds[:1], 3, 40
        base_extra = {"search.max_t": 40, "base.eval_steps": 20, "base.generation_eval_samples": 16,
                      "search.grace_period": 20}
    info = machine()
    import _search

    runs = []
    if args.summarise_only:
        args.resume, seeds = True, []
    if args.resume and Path(args.out).exists():
        kept = json.loads(Path(args.out).read_text())
        runs = kept.get("runs", [])
        if args.summarise_only:
            info = kept.get("machine", info)
        print(f"resuming: {len(runs)} runs kept from {args.out}", file=sys.stderr)
    done = {(r["arm"], r["seed"]) for r in runs}
    storage = _search.new_storage("early")
    t_all = time.perf_counter()
    for seed in seeds:
        for name in arms:
            if (name, seed) in done:
                continue
            arm = ARMS[name]
            extra = {**base_extra, **arm.get("extra", {})}
            if args.quick:
                extra = {k: v for k, v in extra.items() if k not in ALL_PROMPTS} | {
                    k: v for k, v in base_extra.items() if k.startswith("base.")}
                if "search.grace_period" in arm.get("extra", {}):
                    extra["search.grace_period"] = 20
            load_before = load()
            res = _search.run(storage=storage, name=f"{name.replace('+', '-').replace('/', '-')}-s{seed}",
                              num_samples=args.num_samples, max_steps=args.max_steps, scheduler=arm["scheduler"],
                              seed=seed, sampler=arm["sampler"], extra=extra,
                              warm_start=args.warm_sources if arm.get("warm") else None)
            t = res["trials"]
            run = {
                "arm": name, "seed": seed, "wall_s": res["wall_s"], "steps_sum": int(t["steps"].sum()),
                "train_time_s_sum": float(t["final_train_time_s"].sum()),
                "best_objective": float(t["best_objective"].max()),
                "statuses": t["status"].value_counts().to_dict(), "n_trials": len(t),
                "load_before": load_before, "load_after": load(), "experiment_dir": res["exp"],
            }
            runs.append(run)
            write_json(args.out, {"benchmark": "early_stopping", "machine": info, "quick": args.quick,
                                  "settings": vars(args), "partial": True, "runs": runs})
            print(f"  seed {seed} {name:14s}: wall {run['wall_s']:.0f}s steps {run['steps_sum']} "
                  f"best {run['best_objective']:.3f} {run['statuses']} load {run['load_before']}-{run['load_after']}",
                  file=sys.stderr, flush=True)
    total = time.perf_counter() - t_all
    summary, md, target = summarise(runs, [a for a in ARMS if any(r["arm"] == a for r in runs)], args.bar)
    print(f"\nCompute to the best config, cpu-tiny space, {args.num_samples} trials x {args.max_steps} steps, "
          f"concurrency 2, seeds {sorted({r['seed'] for r in runs})}, target {target:.3f} ({BASELINE}'s mean "
          f"best less its noise) and {args.bar:g} ({info['cpu_model']}, {info['cores']} cores, {info['date_utc']}); "
          f"this invocation {total:.0f}s")
    print(md)
    out = write_json(args.out, {"benchmark": "early_stopping", "machine": info, "quick": args.quick,
                                "settings": vars(args), "partial": False, "target": target, "summary": summary,
                                "runs": runs, "markdown": md})
    print(f"wrote {out}")
    return 0


def summarise(runs: list[dict], arms: list[str], bar: float) -> tuple[list[dict], str, float]:
    """Per arm, over seeds: the compute to the target (FIFO + random's mean best less its noise)
    and to the fixed `bar`, and the whole search's cost. Returns (rows, Markdown table, target)."""
    import _search

    base = [r["best_objective"] for r in runs if r["arm"] == BASELINE]
    if not base:
        raise SystemExit(f"no {BASELINE} run to set the target from; add it to --arms")
    best = mean_sd(base)[0]
    target = best - noise(best)
    goals = {"target": target, "bar": bar}
    for r in runs:
        for goal, value in goals.items():
            r[f"to_{goal}"] = _search.compute_to_reach(r["experiment_dir"], value, OBJECTIVE)
    summary = []
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        row = {"arm": arm, "lever": ARMS[arm]["lever"], "n_seeds": len(rs),
               "best_objective_all": [r["best_objective"] for r in rs],
               "load_range": [min(r["load_before"] for r in rs), max(r["load_after"] for r in rs)]}
        for goal in goals:
            row[f"reached_{goal}"] = sum(r[f"to_{goal}"]["reached"] for r in rs)
            row[f"to_{goal}_steps"] = [r[f"to_{goal}"]["steps"] for r in rs]
            row[f"to_{goal}_trials"] = [r[f"to_{goal}"]["trials"] for r in rs]
            row[f"to_{goal}_steps_mean"], row[f"to_{goal}_steps_sd"] = mean_sd(row[f"to_{goal}_steps"])
        for key in ("steps_sum", "train_time_s_sum", "wall_s", "best_objective"):
            row[key + "_mean"], row[key + "_sd"] = mean_sd([r[key] for r in rs])
        summary.append(row)
    ref = next(s for s in summary if s["arm"] == BASELINE)
    headers = ["arm", "lever", f"steps to target {target:.3f} (per seed)", f"mean, vs {BASELINE}",
               f"steps to {bar:g} (per seed)", f"mean, vs {BASELINE}", "steps (whole search)", "train s",
               "wall s", "best success (per seed)", "load"]
    rows = []
    for s, rs in ((s, [r for r in runs if r["arm"] == s["arm"]]) for s in summary):
        cells = []
        for goal in goals:
            cells.append(" ".join(f"{r[f'to_{goal}']['steps']}{'' if r[f'to_{goal}']['reached'] else '*'}"
                                  for r in rs))
            mean = s[f"to_{goal}_steps_mean"]
            cells.append(f"{mean:.0f}, {ref[f'to_{goal}_steps_mean'] / mean:.2f}x")
        rows.append([s["arm"], s["lever"], *cells, f"{s['steps_sum_mean']:.0f}", f"{s['train_time_s_sum_mean']:.0f}",
                     f"{s['wall_s_mean']:.0f}", " ".join(f"{v:.3f}" for v in s["best_objective_all"]),
                     f"{s['load_range'][0]:.1f}-{s['load_range'][1]:.1f}"])
    md = table(headers, rows) + ("\n\n`*`: never reached it; the search's whole step count is used, so a mean "
                                 "with a `*` is a lower bound: a ratio is then a lower bound when the baseline "
                                 "has the `*` and an upper bound when the arm has it.")
    return summary, md, target


if __name__ == "__main__":
    sys.exit(main())
