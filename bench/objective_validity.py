"""Does the objective see generation quality? Rank correlation with the checked success rate.

Runs a real search on a bundled space (its trials report the checked success rate of greedy
answers and bundled:reward's win rates), or reads finished searches given with --experiment, and
prints, for each candidate objective, its Spearman correlation with the success rate across the
trials (final values) and across every evaluation of every trial (step > 0). Also the share of
each trial's time spent in evaluation (generation and reward scoring included), from the
trials' reported time/eval_s against their training time, with and without start-up.

`--baseline initial` (`reward_baseline: initial`): the win rates compare each answer with the
starting model's answer to the same prompt, not with the dataset's chosen answer. On the bundled
task the chosen answer is the correct one, so with `chosen` a correct answer ties the baseline by
identity and the win rate is about half the success rate plus the reward model's errors: partly
circular. `--seeds 0,1,2` runs one search per seed; the final-value correlation is then also
given over all seeds' trials with a 95% bootstrap interval (2000 resamples of trials, within each
seed's search, percentile), and per seed.

`--variant verbose`: the same searches on `bundled:sort-verbose`, whose raters liked a filler tail
(" ok" repeated) that the checked success rate ignores, judged by `bundled:reward-verbose`, which
learnt that liking from them (`bundled/task.py`). There a win rate that follows verbosity rather
than the success rate is being gamed; the table adds each objective's correlation with the
answers' length, and a side-by-side table of the trials' final raw and LC win rates, success
rate and lengths.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

from _common import REPO, load, parser, write_json

CANDIDATES = ("eval/reward_win_rate_lc", "eval/reward_win_rate", "eval/reward_win_prob", "eval/reward_mean",
              "eval/preference_accuracy", "eval/rewards/margins", "eval/loss")
BOOTSTRAP = 2000
TRUTH = "eval/success_rate"
LENGTH = "eval/gen_length"  # mean answer length in tokens (the bundled tokenizer: one per character)
VARIANTS = {
    "sort": {},
    "verbose": {"dataset_mixer": {"bundled:sort-verbose": 1.0}, "reward_model_name_or_path": "bundled:reward-verbose"},
}


def variant_space(space: str, variant: str, out_dir: Path) -> str:
    """`space` with the variant's dataset and reward model (written beside the searches)."""
    import yaml

    if variant == "sort":
        return space
    data = yaml.safe_load(Path(space).read_text())
    data["base"].update(VARIANTS[variant])
    data["name"] = f"{data['name']}-{variant}"
    out = out_dir / f"{Path(space).stem}-{variant}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(out)


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


def final_values(curves: pd.DataFrame) -> pd.DataFrame:
    trained = curves[curves["step"] > 0]
    return trained.sort_values("step").groupby("trial_id").last()


def bootstrap_rho(final: pd.DataFrame, metric: str, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of Spearman's rho over resampled trials (each search resampled
    within itself, so every resample keeps the seeds' mix)."""
    import numpy as np
    from scipy.stats import spearmanr

    rng = np.random.default_rng(seed)
    groups = [g[[metric, TRUTH]].dropna().to_numpy() for _, g in final.groupby("search")]
    rhos = []
    for _ in range(BOOTSTRAP):
        sample = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups if len(g)])
        if np.ptp(sample[:, 0]) == 0 or np.ptp(sample[:, 1]) == 0:
            continue  # a resample of ties only has no rank correlation
        rhos.append(spearmanr(sample[:, 0], sample[:, 1]).statistic)
    lo, hi = np.percentile(rhos, [2.5, 97.5])
    return float(lo), float(hi)


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
    p.add_argument("--seeds", default="0", help="comma list: one search per seed (default 0)")
    p.add_argument("--baseline", choices=("chosen", "initial"), default="chosen",
                   help="reward_baseline of the win rates (default chosen, the space's)")
    p.add_argument("--variant", choices=tuple(VARIANTS), default="sort",
                   help="bundled dataset: sort, or verbose (length-biased labels and reward model)")
    p.add_argument("--experiment", nargs="*", help="finished search directories to read instead of searching")
    args = p.parse_args()
    load_before = load()
    if args.experiment:
        exps = [Path(e) for e in args.experiment]
        wall = None
    else:
        from simpo_ray.search.run import run_search

        t0 = time.perf_counter()
        suffix = ("" if args.variant == "sort" else f"-{args.variant}") + \
            ("" if args.baseline == "chosen" else f"-{args.baseline}")
        storage = REPO / "bench" / "results" / "searches"
        space = variant_space(args.space, args.variant, storage)
        exps = []
        for seed in (int(x) for x in args.seeds.split(",")):
            exps.append(run_search(space, storage_path=str(storage),
                                   name=f"objective-validity{suffix}-seed{seed}",
                                   overrides={"search.num_samples": args.num_samples, "search.seed": seed,
                                              "base.reward_baseline": args.baseline}, verbose=0))
            print(f"  seed {seed} done, load {load()}", file=sys.stderr, flush=True)
        wall = time.perf_counter() - t0
    curves = pd.concat([pd.read_csv(e / "curves.csv").assign(search=e.name,
                                                             trial_id=lambda d, e=e: e.name + "/" + d["trial_id"])
                        for e in exps])
    rows = correlations(curves)
    final = final_values(curves)
    for r in rows:
        r["ci95_final"] = bootstrap_rho(final, r["metric"]) if len(exps) > 1 or len(final) >= 8 else None
        r["per_search_final"] = {}
        for name, part in curves.groupby("search"):
            one = correlations(part)
            r["per_search_final"][name] = next(x["spearman_final"] for x in one if x["metric"] == r["metric"])
    final_all = final_values(curves)
    length_rho = {}
    if LENGTH in final_all:
        from scipy.stats import spearmanr

        for metric in (TRUTH, *CANDIDATES[:3]):
            if metric in final_all:
                length_rho[metric] = float(spearmanr(final_all[metric], final_all[LENGTH]).statistic)
    cost = eval_share(curves)
    print(f"load average {load_before} before, {load()} after; searches: {', '.join(str(e) for e in exps)}"
          + (f"; wall {wall:.0f}s" if wall else ""))
    print(f"\nreward_baseline: {args.baseline}; {len(exps)} search(es) of {args.num_samples} trials")
    print(f"\n| objective | Spearman with {TRUTH} (final, per trial) | 95% bootstrap interval | per search | "
          "(every eval, step > 0) | trials | points |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ci = f"[{r['ci95_final'][0]:+.2f}, {r['ci95_final'][1]:+.2f}]" if r["ci95_final"] else "-"
        per = " ".join(f"{v:+.2f}" for v in r["per_search_final"].values())
        print(f"| {r['metric']} | {r['spearman_final']:+.2f} | {ci} | {per} | {r['spearman_all']:+.2f} | "
              f"{r['trials']} | {r['points']} |")
    if length_rho:
        print(f"\nSpearman with the answers' length ({LENGTH}, final, per trial): "
              + ", ".join(f"{m} {v:+.2f}" for m, v in length_rho.items()))
        cols = [TRUTH, "eval/reward_win_rate", "eval/reward_win_rate_lc", "eval/reward_win_prob", LENGTH,
                "eval/baseline_gen_length"]
        side = final_all[[c for c in cols if c in final_all]].sort_values(LENGTH)
        print("\nfinal values per trial, by answer length:\n")
        print("| trial | " + " | ".join(c.removeprefix("eval/") for c in side.columns) + " |")
        print("|---|" + "---|" * len(side.columns))
        for trial, r in side.iterrows():
            print(f"| {trial} | " + " | ".join(f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" for v in r) + " |")
        means = side.mean()
        print(f"| mean | " + " | ".join(f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" for v in means) + " |")
    print(f"\nevaluation's share of a trial: {cost['eval_share_mean']:.1%} of training+eval time on average "
          f"(max {cost['eval_share_max']:.1%}; {cost['eval_share_with_startup_mean']:.1%} counting start-up); "
          f"per trial {cost['eval_s_per_trial']:.1f}s eval (generation {cost['generation_s_per_trial']:.1f}s, "
          f"reward model {cost['reward_s_per_trial']:.1f}s) vs {cost['train_s_per_trial']:.1f}s training")
    write_json(args.out, {"baseline": args.baseline, "variant": args.variant, "correlations": rows, "cost": cost,
                          "length_spearman": length_rho,
                          "final": final_all.reset_index()[["trial_id", *[c for c in (TRUTH, *CANDIDATES, LENGTH)
                                                                          if c in final_all]]].to_dict("records"),
                          "experiments": [str(e) for e in exps],
                          "load_before": load_before, "load_after": load(), "wall_s": wall})
    return 0


if __name__ == "__main__":
    sys.exit(main())
