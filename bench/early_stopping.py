"""Does early stopping pay? ASHA vs FIFO (both with seeded TPE), and TPE vs random search
(both FIFO), on the bundled cpu-tiny space: same trial count, same seeds, same step budget.

Per search: compute used (training steps summed over trials, and the summed `train_time_s`),
wall time, and the best objective reached (`eval/success_rate`, max over trials and reports
after step 0, i.e. trials.csv `best_objective`). Averaged over seeds, with the standard
deviation. All searches run in one process on one Ray cluster (ray.init paid once).

Random search is the space's own `search.sampler: random` (Optuna's RandomSampler, same seed,
same distributions, the same documented-default first points as TPE).

Default budget: the cpu-tiny space's own search, 12 trials x 600 steps, eval every 100 steps with
128 generation prompts, ASHA grace 200 / reduction 3 / max_t 600, concurrency 2, seeds 0 1 2;
arms fifo+tpe, asha+tpe, fifo+random (9 searches, ~30 min on 2 quiet cores). TPE proposes from
its model only after its start-up trials (the space's points_to_evaluate + 2), so budgets of 4-6
trials compare two random searches.

Usage: .venv/bin/python bench/early_stopping.py [--quick] [--seeds 0,1,2]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, load, machine, mean_sd, table, write_json  # noqa: E402

ARMS = {"fifo+tpe": ("fifo", "tpe"), "asha+tpe": ("asha", "tpe"), "fifo+random": ("fifo", "random"),
        "asha+random": ("asha", "random")}


def main(argv=None) -> int:
    p = parser(__doc__, "early_stopping")
    p.add_argument("--quick", action="store_true", help="smoke check: 1 seed, 3 trials x 40 steps, 2 arms")
    p.add_argument("--arms", default="fifo+tpe,asha+tpe,fifo+random", help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--seeds", default="0,1,2", help="search seeds (TPE/random sampler seed)")
    p.add_argument("--num-samples", type=int, default=12, help="trials per search")
    p.add_argument("--max-steps", type=int, default=600, help="steps of a trial that runs to the end")
    p.add_argument("--eval-steps", type=int, default=100, help="eval (and ASHA decision) every N steps")
    p.add_argument("--generation-samples", type=int, default=128, help="prompts of the success-rate eval")
    p.add_argument("--grace-period", type=int, default=200, help="ASHA grace period (steps)")
    p.add_argument("--reduction-factor", type=int, default=3, help="ASHA reduction factor")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at a time")
    args = p.parse_args(argv)
    if args.quick:
        args.arms, args.seeds, args.num_samples, args.max_steps = "fifo+tpe,asha+random", "0", 3, 40
        args.eval_steps, args.generation_samples, args.grace_period = 20, 16, 20
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for a in arms:
        if a not in ARMS:
            p.error(f"--arms: unknown arm {a!r}; allowed: {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = {"base.eval_steps": args.eval_steps, "base.generation_eval_samples": args.generation_samples,
             "search.grace_period": args.grace_period, "search.reduction_factor": args.reduction_factor,
             "search.max_t": args.max_steps}
    info = machine()
    import _search

    storage = _search.new_storage("early")
    runs = []
    t_all = time.perf_counter()
    for seed in seeds:
        for arm in arms:  # interleaved, so drifting load hits every arm alike
            scheduler, sampler = ARMS[arm]
            load_before = load()
            res = _search.run(storage=storage, name=f"{arm.replace('+', '-')}-s{seed}", num_samples=args.num_samples,
                              max_steps=args.max_steps, scheduler=scheduler, seed=seed, sampler=sampler,
                              max_concurrent=args.max_concurrent, extra=extra)
            t = res["trials"]
            run = {
                "arm": arm, "seed": seed, "wall_s": res["wall_s"], "steps_sum": int(t["steps"].sum()),
                "train_time_s_sum": float(t["final_train_time_s"].sum()),
                "best_objective": float(t["best_objective"].max()),
                "default_objective": float(t.loc[t["is_default"], "best_objective"].max()) if t["is_default"].any() else float("nan"),
                "statuses": t["status"].value_counts().to_dict(), "n_trials": len(t),
                "load_before": load_before, "load_after": load(), "experiment_dir": res["exp"],
            }
            runs.append(run)
            write_json(args.out, {"benchmark": "early_stopping", "machine": info, "quick": args.quick,
                                  "settings": vars(args), "partial": True, "runs": runs})
            print(f"  seed {seed} {arm:12s}: wall {run['wall_s']:.0f}s steps {run['steps_sum']} "
                  f"best {run['best_objective']:.3f} {run['statuses']} load {run['load_after']}",
                  file=sys.stderr, flush=True)
    total = time.perf_counter() - t_all
    summary = []
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        row = {"arm": arm, "n_seeds": len(rs)}
        for key in ("steps_sum", "train_time_s_sum", "wall_s", "best_objective"):
            row[key + "_mean"], row[key + "_sd"] = mean_sd([r[key] for r in rs])
        row["best_objective_all"] = [r["best_objective"] for r in rs]
        row["load_range"] = [min(r["load_before"] for r in rs), max(r["load_after"] for r in rs)]
        summary.append(row)
    ref = {r["arm"]: r for r in summary}

    def pm(row, key, fmt):
        return f"{fmt.format(row[key + '_mean'])} ± {fmt.format(row[key + '_sd'])}"

    headers = ["arm", "seeds", "steps used (sum)", "train-step s (sum)", "wall s", "best eval/success_rate",
               "per-seed best", "steps vs fifo+tpe", "load"]
    rows = []
    for s in summary:
        rel = (f"{s['steps_sum_mean'] / ref['fifo+tpe']['steps_sum_mean']:.2f}x" if "fifo+tpe" in ref else "")
        rows.append([s["arm"], s["n_seeds"], pm(s, "steps_sum", "{:.0f}"), pm(s, "train_time_s_sum", "{:.0f}"),
                     pm(s, "wall_s", "{:.0f}"), pm(s, "best_objective", "{:.3f}"),
                     " ".join(f"{v:.3f}" for v in s["best_objective_all"]), rel,
                     f"{s['load_range'][0]:.1f}-{s['load_range'][1]:.1f}"])
    md = table(headers, rows)
    print(f"\nEarly stopping / sampler, cpu-tiny space, {args.num_samples} trials x {args.max_steps} steps, "
          f"eval every {args.eval_steps} ({args.generation_samples} generation prompts), ASHA grace "
          f"{args.grace_period} rf {args.reduction_factor}, concurrency {args.max_concurrent}, seeds {seeds} "
          f"({info['cpu_model']}, {info['cores']} cores, {info['date_utc']}); whole script {total:.0f}s")
    print(md)
    out = write_json(args.out, {"benchmark": "early_stopping", "machine": info, "quick": args.quick,
                                "settings": vars(args), "partial": False, "total_s": total, "summary": summary, "runs": runs,
                                "markdown": md})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
