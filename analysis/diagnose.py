"""The guide's tuning advice ("Step 2: Monitor", "Step 3: Adjust if Needed") applied to the
measured learning curves.

Per trial (`trial_flags`):
- diverged: status `diverged` or a report with `diverged` = 1.
- plateau: a trial that ran its full budget whose loss (`eval/loss`, else `loss`) fell by less
  than PLATEAU_TOL of its first value over the second half of its steps, and that is not among
  the top trials: it stopped learning at a poor score.
- flat margin: the reward margin (`eval/rewards/margins`, else `rewards/margins`) at the last
  report is not above the first.
- forgetting: chosen NLL (`eval/sft_loss`) rose by more than FORGET_TOL of its first value while
  sft_weight < LOW_SFT_WEIGHT.
- length exploitation (trials run with a reward model; not one of the guide's checks): from the
  first report (step 0, the starting model) to the last, the raw reward win rate
  (`eval/reward_win_rate`) rose by WIN_RISE (0.05) or more, the length-controlled win rate
  (`eval/reward_win_rate_lc`) rose by LC_FLAT (0.02) at most (it may have fallen: a fall while the
  raw rate rises is exploitation too), and the mean generated length (`eval/gen_length`) grew by
  LENGTH_RISE (10%) or more of its first value. The reward model prefers the longer answers, not
  better ones: the gain disappears once length is controlled for.
`diagnose` groups them per size with the guide's suggested adjustment (for length exploitation,
this project's own).
"""

from __future__ import annotations

import pandas as pd

from analysis.load import Results
from analysis.quality import GEN_LENGTH, WIN, WIN_LC
from analysis.tables import best_trial, fmt, top_trials
from simpo_ray.search.records import RANKED_STATUSES

PLATEAU_TOL = 0.02
FORGET_TOL = 0.05
LOW_SFT_WEIGHT = 0.1  # below the guide's instruct-model setting (0.05-0.1 at most)
WIN_RISE = 0.05  # length exploitation: the raw win rate rose at least this much from step 0,
LC_FLAT = 0.02  # the LC win rate rose at most this much (or fell),
LENGTH_RISE = 0.10  # and the mean generated length grew at least this share
LENGTH_RULE = (f"raw win rate up ≥ {WIN_RISE:g} from step 0 while the length-controlled win rate moved "
               f"≤ +{LC_FLAT:g} and the mean generated length grew ≥ {LENGTH_RISE:.0%}")

ADVICE = {
    "diverged": "guide: if loss diverges, reduce learning_rate and beta (its 7B example: 5e-7 → 3e-7, 2.0 → 1.0)",
    "plateau": "guide: if loss plateaus early, increase learning_rate and beta (its 7B example: 5e-7 → 1e-6, 2.0 → 5.0)",
    "flat margin": ("guide: the reward margin should increase (Step 2); as for an early plateau, "
                    "increase learning_rate and beta"),
    "forgetting": "guide: if the model forgets, increase sft_weight (its example: 0.0 → 0.2)",
    "length exploitation": ("not from the guide (it does not cover answer length): the reward model is rewarding "
                            f"longer answers; rank by {WIN_LC} rather than {WIN} or eval/reward_mean, and "
                            "prefer a larger sft_weight (on the bundled task the SFT term kept answers from "
                            "rambling, README)"),
}


def _series(curve: pd.DataFrame, names: tuple[str, ...]) -> pd.Series:
    for n in names:
        if n in curve.columns and curve[n].notna().sum() >= 2:
            return curve.dropna(subset=[n]).set_index("step")[n].astype(float)
    return pd.Series(dtype=float)


def trial_flags(results: Results) -> pd.DataFrame:
    """One row per trial: the four booleans above and the numbers behind them."""
    rows = []
    for size in results.sizes:
        top = set(zip(*[top_trials(results, size)[c] for c in ("experiment", "trial_id")]))
        for _, t in results.of_size(size).iterrows():
            c = results.curve(t["experiment"], t["trial_id"])
            diverged = t["status"] == "diverged" or (
                "diverged" in c.columns and (pd.to_numeric(c["diverged"], errors="coerce") == 1).any())
            row = {"size": size, "experiment": t["experiment"], "trial_id": t["trial_id"],
                   "status": t["status"], "diverged": bool(diverged), "plateau": False,
                   "flat_margin": False, "forgetting": False, "length_exploitation": False,
                   "loss_change_2nd_half": float("nan"), "margin_change": float("nan"), "nll_change": float("nan"),
                   "win_change": float("nan"), "lc_change": float("nan"), "length_change": float("nan")}
            if not diverged and t["status"] != "errored":
                loss = _series(c, ("eval/loss", "loss"))
                if len(loss) >= 3 and t["status"] == "completed":
                    mid = loss[loss.index <= loss.index[0] + (loss.index[-1] - loss.index[0]) / 2].iloc[-1]
                    change = (mid - loss.iloc[-1]) / max(abs(loss.iloc[0]), 1e-12)
                    row["loss_change_2nd_half"] = change
                    row["plateau"] = bool(change < PLATEAU_TOL and (t["experiment"], t["trial_id"]) not in top)
                margin = _series(c, ("eval/rewards/margins", "rewards/margins"))
                if len(margin) >= 2:
                    row["margin_change"] = margin.iloc[-1] - margin.iloc[0]
                    row["flat_margin"] = bool(row["margin_change"] <= 0)
                nll = _series(c, ("eval/sft_loss",))
                if len(nll) >= 2:
                    row["nll_change"] = (nll.iloc[-1] - nll.iloc[0]) / max(abs(nll.iloc[0]), 1e-12)
                    row["forgetting"] = bool(row["nll_change"] > FORGET_TOL
                                             and t.get("sft_weight", 0.0) < LOW_SFT_WEIGHT)
                row.update(_length_exploitation(c))
            rows.append(row)
    return pd.DataFrame(rows)


def _length_exploitation(curve: pd.DataFrame) -> dict:
    """The length-exploitation check of one trial's curve (module docstring); {} without the metrics."""
    win, lc, length = (_series(curve, (m,)) for m in (WIN, WIN_LC, GEN_LENGTH))
    if not (len(win) and len(lc) and len(length)):
        return {}
    out = {"win_change": win.iloc[-1] - win.iloc[0], "lc_change": lc.iloc[-1] - lc.iloc[0],
           "length_change": (length.iloc[-1] - length.iloc[0]) / max(abs(length.iloc[0]), 1e-12)}
    eps = 1e-9  # 0.62 - 0.57 is 0.04999... in floating point
    out["length_exploitation"] = bool(out["win_change"] >= WIN_RISE - eps and out["lc_change"] <= LC_FLAT + eps
                                      and out["length_change"] >= LENGTH_RISE - eps)
    return out


def _region(t: pd.DataFrame, params: tuple[str, ...] = ("learning_rate", "beta")) -> str:
    parts = []
    for p in params:
        if p in t.columns and t[p].notna().any():
            lo, hi = t[p].min(), t[p].max()
            parts.append(f"{p} {fmt(lo, p)}" + ("" if lo == hi else f"–{fmt(hi, p)}"))
    return ", ".join(parts)


def diagnose(results: Results, flags: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per size and check: how many trials, where in the space, and the guide's adjustment."""
    flags = trial_flags(results) if flags is None else flags
    rows = []
    for size in results.sizes:
        f = flags[flags["size"] == size]
        trials = results.of_size(size)
        joined = trials.merge(f[["experiment", "trial_id", "diverged", "plateau", "flat_margin", "forgetting",
                                 "nll_change", "length_exploitation", "win_change", "lc_change", "length_change"]],
                              on=["experiment", "trial_id"])
        n = len(trials)
        ok = joined[~joined["diverged"] & joined["status"].isin(RANKED_STATUSES)]

        div = joined[joined["diverged"]]
        if len(div):
            finding = f"{len(div)} of {n} trials diverged at {_region(div)}"
            safe = ok[ok["learning_rate"] < div["learning_rate"].min()] if "learning_rate" in ok else ok
            if len(ok):
                finding += f"; finished trials reached learning_rate {fmt(ok['learning_rate'].max(), 'learning_rate')}"
            advice = (ADVICE["diverged"] + f"; here keep learning_rate below "
                      f"{fmt(div['learning_rate'].min(), 'learning_rate')}"
                      + (f" (largest stable below it: {fmt(safe['learning_rate'].max(), 'learning_rate')})"
                         if len(safe) else ""))
            rows.append(_row(size, "diverged", div, finding, advice))

        top_region = f"; the top trials used {_region(top_trials(results, size))}"
        pla = joined[joined["plateau"]]
        if len(pla):
            finding = (f"{len(pla)} full-budget trial(s) outside the top stopped improving the loss "
                       f"(< {PLATEAU_TOL:.0%} in the second half) at {_region(pla)}")
            rows.append(_row(size, "loss plateau", pla, finding, ADVICE["plateau"] + top_region))

        flat = joined[joined["flat_margin"]]
        if len(flat):
            finding = f"{len(flat)} trial(s) ended with a reward margin no larger than at the first report, at {_region(flat)}"
            rows.append(_row(size, "reward margin did not grow", flat, finding, ADVICE["flat margin"] + top_region))

        fo = joined[joined["forgetting"]]
        if len(fo):
            hi = joined[(joined["sft_weight"] >= LOW_SFT_WEIGHT) & joined["nll_change"].notna()]
            finding = (f"{len(fo)} trial(s) with sft_weight < {LOW_SFT_WEIGHT} saw chosen NLL (eval/sft_loss) rise "
                       f"by more than {FORGET_TOL:.0%} (median {fo['nll_change'].median():+.0%})")
            if len(hi):
                finding += (f"; with sft_weight ≥ {LOW_SFT_WEIGHT} it rose "
                            f"{hi['nll_change'].median():+.0%} (median of {len(hi)})")
            rows.append(_row(size, "forgetting", fo, finding, ADVICE["forgetting"]))

        lx = joined[joined["length_exploitation"]]
        if len(lx):
            named = "; ".join(f"{r.trial_id} (win {r.win_change:+.3f}, LC {r.lc_change:+.3f}, length "
                              f"{r.length_change:+.0%})" for r in lx.itertuples())
            best = best_trial(results, size)
            finding = (f"{len(lx)} trial(s) gained win rate through length ({LENGTH_RULE}): {named}"
                       + (f"; the best trial {best['trial_id']} is one of them"
                          if (best["experiment"], best["trial_id"]) in set(zip(lx["experiment"], lx["trial_id"]))
                          else ""))
            advice = (ADVICE["length exploitation"]
                      + f"; these trials used {_region(lx, ('learning_rate', 'beta', 'sft_weight'))}")
            rows.append(_row(size, "length exploitation", lx, finding, advice))
    return pd.DataFrame(rows, columns=["size", "check", "n_trials", "trials", "finding", "advice"])


def _row(size: str, check: str, t: pd.DataFrame, finding: str, advice: str) -> dict:
    return {"size": size, "check": check, "n_trials": len(t), "trials": " ".join(map(str, t["trial_id"])),
            "finding": finding, "advice": advice}
