"""Does the objective see generation quality? Rank correlation with the checked success rate.

Runs a real search on a bundled space (its trials report the checked success rate of greedy
answers and bundled:reward's win rates), or reads finished searches given with --experiment, and
prints, for each candidate objective, its Spearman correlation with the success rate across the
trials (final values) and across every evaluation of every trial (step > 0). Also the share of
each trial's time spent in evaluation (generation and reward scoring included), from the
trials' reported time/eval_s against their training time, with and without start-up.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

from _common import REPO, load, parser, write_json

CANDIDATES = ("eval/reward_win_rate_lc", "eval/reward_win_rate", "eval/reward_mean",
              "eval/preference_accuracy", "eval/rewards/margins", "eval/loss")
TRUTH = "eval/success_rate"


def correlations(curves: pd.DataFrame) -> list[dict]:
    from scipy.stats import spearmanr

    trained = curves[curves["step"] > 0]
    final = trained.sort_values("step").groupby("trial_id").last()
    rows = []
    for metric in CANDIDATES:
        if metric not in curves:
            continue
        rho_final = spearmanr(final[metric], final[TRUTH]).statistic
        rho_all = spearmanr(trained[metric], trained[TRUTH], nan_policy="omit").statistic
        rows.append({"metric": metric, "spearman_final": float(rho_final), "spearman_all": float(rho_all),
                     "trials": int(final[metric].notna().sum()), "points": int(trained[metric].notna().sum())})
    return rows


def eval_share(curves: pd.DataFrame) -> dict:
    per = curves.groupby("trial_id").agg(eval_s=("time/eval_s", "sum"), train_s=("train_time_s", "max"),
                                         startup_s=("startup_s", "max"),
                                         gen_s=("time/generation_s", "sum"), reward_s=("time/reward_s", "sum"))
    share = per["eval_s"] / (per["eval_s"] + per["train_s"])
    with_startup = per["eval_s"] / (per["eval_s"] + per["train_s"] + per["startup_s"])
    return {"eval_share_mean": float(share.mean()), "eval_share_max": float(share.max()),
            "eval_share_with_startup_mean": float(with_startup.mean()),
            "generation_s_per_trial": float(per["gen_s"].mean()), "reward_s_per_trial": float(per["reward_s"].mean()),
            "eval_s_per_trial": float(per["eval_s"].mean()), "train_s_per_trial": float(per["train_s"].mean())}


def main() -> int:
    p = parser(__doc__, "objective_validity")
    p.add_argument("--space", default=str(REPO / "search_spaces" / "cpu-tiny.yaml"))
    p.add_argument("--num-samples", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experiment", nargs="*", help="finished search directories to read instead of searching")
    args = p.parse_args()
    load_before = load()
    if args.experiment:
        exps = [Path(e) for e in args.experiment]
        wall = None
    else:
        from simpo_ray.search.run import run_search

        t0 = time.perf_counter()
        exps = [run_search(args.space, storage_path=str(REPO / "bench" / "results" / "searches"),
                           name=f"objective-validity-seed{args.seed}",
                           overrides={"search.num_samples": args.num_samples, "search.seed": args.seed}, verbose=0)]
        wall = time.perf_counter() - t0
    curves = pd.concat([pd.read_csv(e / "curves.csv").assign(trial_id=lambda d, e=e: e.name + "/" + d["trial_id"])
                        for e in exps])
    rows = correlations(curves)
    cost = eval_share(curves)
    print(f"load average {load_before} before, {load()} after; searches: {', '.join(str(e) for e in exps)}"
          + (f"; wall {wall:.0f}s" if wall else ""))
    print(f"\n| objective | Spearman with {TRUTH} (final, per trial) | (every eval, step > 0) | trials | points |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['metric']} | {r['spearman_final']:+.2f} | {r['spearman_all']:+.2f} | {r['trials']} | {r['points']} |")
    print(f"\nevaluation's share of a trial: {cost['eval_share_mean']:.1%} of training+eval time on average "
          f"(max {cost['eval_share_max']:.1%}; {cost['eval_share_with_startup_mean']:.1%} counting start-up); "
          f"per trial {cost['eval_s_per_trial']:.1f}s eval (generation {cost['generation_s_per_trial']:.1f}s, "
          f"reward model {cost['reward_s_per_trial']:.1f}s) vs {cost['train_s_per_trial']:.1f}s training")
    write_json(args.out, {"correlations": rows, "cost": cost, "experiments": [str(e) for e in exps],
                          "load_before": load_before, "load_after": load(), "wall_s": wall})
    return 0


if __name__ == "__main__":
    sys.exit(main())
