"""Generation quality as the training loop reports it when a reward model is set
(`reward_model_name_or_path`): the names analysis reads, and which of them a search holds.

`eval/reward_win_rate`: share of held-out prompts whose generated answer the reward model scores
above the baseline answer (ties 0.5); `eval/reward_win_rate_lc`: the same, length-controlled
(AlpacaEval 2 style, `simpo_ray.train.reward.lc_win_rate`); `eval/gen_length` / `eval/baseline_gen_length`:
mean generated tokens of the policy's and the baseline's answers; `eval/truncated_rate` and
`eval/length_separates`: whether those can be read as they are (`simpo_ray.train.generation_checks`,
a warning under the best trial). Searches without a reward model
have none of them, and every table, plot and check built on them is left out.
"""

from __future__ import annotations

import pandas as pd

WIN, WIN_LC, GEN_LENGTH = "eval/reward_win_rate", "eval/reward_win_rate_lc", "eval/gen_length"
BASELINE_LENGTH = "eval/baseline_gen_length"
# The final values shown beside the score in the tables, by their short name there.
QUALITY = {WIN_LC: "lc_win_rate", WIN: "win_rate", GEN_LENGTH: "gen_length"}


def quality_columns(trials: pd.DataFrame) -> dict[str, str]:
    """`final_<metric>` column -> short name, for the `QUALITY` metrics some trial reported."""
    return {f"final_{m}": name for m, name in QUALITY.items()
            if f"final_{m}" in trials and pd.to_numeric(trials[f"final_{m}"], errors="coerce").notna().any()}


def pareto_markdown(results, size: str, fmt) -> list[str]:
    """The Pareto front of a multi-objective search (trials.csv `pareto_front`, final values of
    every objective), as Markdown lines; [] for a search with one objective."""
    t = results.of_size(size)
    objectives: list[str] = []
    for e in results.experiments:
        objectives = objectives or list(e.search.search.get("objectives") or [])
    if not objectives or "pareto_front" not in t:
        return []
    on = t[t["pareto_front"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))]
    columns = {"objective_value" if m == results.objective else f"final_{m}": m for m in objectives}
    shown = on[["trial_id", "status", *[c for c in results.searched_params(size) if c in on], *[c for c in columns if c in on]]]
    shown = shown.rename(columns=columns)
    lines = [f"Pareto front of {', '.join(f'`{m}`' for m in objectives)} ({len(on)} of {len(t)} trials; no other "
             "completed trial is at least as good on every objective and better on one; final values; trials "
             "stopped early are of an earlier step and not compared):", ""]
    header = "| " + " | ".join(shown.columns) + " |"
    lines += [header, "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(fmt(v, c) for c, v in r.items()) + " |" for _, r in shown.iterrows()]
    return lines + [""]
