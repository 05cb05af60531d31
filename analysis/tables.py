"""What the analysis tables share: picking a size's best and top trials, and formatting numbers,
ranges and Markdown tables. `report`, `diagnose`, `extrapolate` and `plots` import it, never
each other's helpers."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from analysis.load import Results, guide_for
from analysis.quality import BASELINE_LENGTH, QUALITY
from simpo_ray.guide import PARAMS
from simpo_ray.search import records

TOP_FRAC = 0.25
MIN_TOP = 3


def top_k(n_finished: int, top_frac: float = TOP_FRAC, min_top: int = MIN_TOP) -> int:
    return min(n_finished, max(min_top, math.ceil(top_frac * n_finished)))


def top_trials(results: Results, size: str, top_frac: float = TOP_FRAC, min_top: int = MIN_TOP) -> pd.DataFrame:
    ranked = results.ranked(size)
    return ranked.head(top_k(len(ranked), top_frac, min_top))


def best_trial(results: Results, size: str) -> pd.Series:
    """The best trial of a size (`simpo_ray.search.records.best_trial`; every size has one)."""
    return records.best_trial(results.of_size(size), results.mode)


def guide(results: Results, size: str) -> dict[str, dict[str, float]]:
    """The guide's numbers for a size, from the search holding its best trial."""
    return guide_for(results.experiment(best_trial(results, size)["experiment"]))


def fmt(v: Any, param: str | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        if param == "learning_rate" or (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5)):
            return f"{v:.2e}"
        return f"{v:.3g}"
    return str(v)


def fmt_range(lo: float, hi: float, param: str | None = None) -> str:
    if math.isnan(lo) and math.isnan(hi):
        return "n/a"
    if lo == hi:
        return fmt(lo, param)
    return f"{fmt(lo, param)} – {fmt(hi, param)}"


def md_table(df: pd.DataFrame) -> str:
    """A GitHub-markdown table (pandas' to_markdown needs tabulate; this does not)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def quality_text(t: pd.Series, columns: dict[str, str]) -> str:
    """'; final LC win rate 0.61, win rate 0.66, 46 generated tokens (baseline 42)' or ''."""
    words = {"lc_win_rate": "LC win rate {}", "win_rate": "win rate {}", "gen_length": "{} generated tokens"}
    base = t.get(f"final_{BASELINE_LENGTH}")
    parts = [words[n].format(fmt(float(t[c]))) + (f" (baseline {fmt(float(base))})" if n == "gen_length"
                                                  and pd.notna(base) else "")
             for c, n in columns.items() if pd.notna(t.get(c))]
    return "; final " + ", ".join(parts) if parts else ""


def recommendation_display(rec: pd.DataFrame, size: str) -> pd.DataFrame:
    r = rec[rec["size"] == size]
    return pd.DataFrame({
        "parameter": r["parameter"],
        "recommended": [fmt(v, p) for v, p in zip(r["recommended"], r["parameter"])],
        "robust range": [f"{fmt_range(lo, hi, p)} (top {k} of {n})" for lo, hi, p, k, n in
                         zip(r["robust_low"], r["robust_high"], r["parameter"], r["support"], r["n_finished"])],
        "guide default": [fmt(v, p) for v, p in zip(r["guide_default"], r["parameter"])],
        "guide range": [fmt_range(lo, hi, p) for lo, hi, p in zip(r["guide_low"], r["guide_high"], r["parameter"])],
        "documented range": [fmt_range(lo, hi, p) for lo, hi, p in
                             zip(r["documented_low"], r["documented_high"], r["parameter"])],
        "flag": ["⚠ " + f if f else "" for f in r["flag"]],
    })


def cross_size_display(cs: pd.DataFrame) -> pd.DataFrame:
    out = cs[["size", "model"]].copy()
    for p in PARAMS:
        if p in cs.columns:
            out[p] = [fmt(v, p) for v in cs[p]]
            out[f"{p} (guide)"] = [f"{fmt(d, p)} [{r}]" for d, r in zip(cs[f"{p} guide"], cs[f"{p} guide range"])]
    out["score"] = [fmt(v) for v in cs["score"]]
    out["final score"] = [fmt(v) for v in cs["final_score"]]
    for n in QUALITY.values():
        if f"final_{n}" in cs:
            out[f"final {n.replace('_', ' ')}"] = [fmt(v) for v in cs[f"final_{n}"]]
    return out
