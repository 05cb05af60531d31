"""Generation quality as the training loop reports it when a reward model is set
(`reward_model_name_or_path`): the names analysis reads, and which of them a search holds.

`eval/reward_win_rate`: share of held-out prompts whose generated answer the reward model scores
above the baseline answer (ties 0.5); `eval/reward_win_rate_lc`: the same, length-controlled
(AlpacaEval 2 style, `simpo_ray.reward.lc_win_rate`); `eval/gen_length` / `eval/baseline_gen_length`:
mean generated tokens of the policy's and the baseline's answers. Searches without a reward model
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
