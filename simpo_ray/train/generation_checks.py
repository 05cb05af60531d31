"""Whether a generation evaluation's numbers mean what they seem to: two cases where a high win
rate says little about the answers, each a metric the evaluation reports and one warning line
that the run, the search summary and the analysis print beside the win rates.

- `eval/truncated_rate`: the share of generations cut at `max_new_tokens` (no end-of-turn token).
  Above `TRUNCATED_LIMIT` most scored answers are unfinished; a model that writes "sssss..." to
  the limit scored win rate 1.0 / LC 0.999 against a reward model that likes long answers.
- `eval/length_separates`: +1 when every win's length difference to its baseline answer
  (characters, as the LC fit uses) exceeds every loss's, -1 when it is below every loss's, 0
  otherwise (ties, and evaluations without both a win and a loss, do not count). At +-1 the
  length-controlled fit's data do not pin down the win rate at zero length difference: its
  value rests on the fit's penalty (`reward.lc_win_rate`).

Pure Python (no torch, no numpy), so the search and the analysis read it without the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

TRUNCATED = "eval/truncated_rate"
LENGTH_SEPARATES = "eval/length_separates"
TRUNCATED_LIMIT = 0.5  # "most generations": more than half


def length_separates(win: Sequence[float], policy_len: Sequence[float], baseline_len: Sequence[float]) -> float:
    """+1.0 / -1.0 / 0.0 as `LENGTH_SEPARATES` (module doc): whether a threshold on the length
    difference alone tells every win (1) from every loss (0). Strictly: equal differences on
    both sides leave the fit finite, so they do not count as separated."""
    d = [float(p) - float(b) for p, b in zip(policy_len, baseline_len)]
    won = [x for x, w in zip(d, win) if w == 1.0]
    lost = [x for x, w in zip(d, win) if w == 0.0]
    if not won or not lost:
        return 0.0
    if min(won) > max(lost):
        return 1.0
    if max(won) < min(lost):
        return -1.0
    return 0.0


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def problems(metrics: Mapping[str, Any], max_new_tokens: int | None = None) -> dict[str, str]:
    """{"truncated" | "length": what to say} for what `metrics` (one report, or a trial's
    final values without their `final_` prefix) shows; {} when the win rates can be read as
    they are, or when the evaluation measured neither (older runs, no generation eval)."""
    out = {}
    cut = _number(metrics.get(TRUNCATED))
    if cut is not None and cut > TRUNCATED_LIMIT:
        limit = f"max_new_tokens={max_new_tokens}" if max_new_tokens else "max_new_tokens"
        out["truncated"] = (f"{cut:.0%} of generations were cut at {limit} (no end-of-turn token), "
                            "so the scores rate unfinished answers")
    side = _number(metrics.get(LENGTH_SEPARATES))
    if side:
        how = "above" if side > 0 else "below"
        out["length"] = (f"length alone separates wins from losses (every win's length over its baseline is {how} "
                         "every loss's), so the LC win rate rests on its fit's penalty, not on the data")
    return out


def warning_line(metrics: Mapping[str, Any], max_new_tokens: int | None = None) -> str:
    """'warning: ...' in one line, or '' when there is nothing to say (`problems`)."""
    found = problems(metrics, max_new_tokens)
    return "warning: " + "; ".join(found.values()) if found else ""


def final_values(row: Mapping[str, Any]) -> dict[str, Any]:
    """A trials.csv row's final metrics under their reported names (`final_eval/x` -> `eval/x`)."""
    return {k.removeprefix("final_"): v for k, v in row.items() if str(k).startswith("final_")}
