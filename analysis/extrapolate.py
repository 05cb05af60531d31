"""Predicted settings for model sizes that were not searched, labelled as extrapolated.

From the trends across the searched sizes (`simpo_ray.transfer.trends.fit_trends`: each size's top
trials, log10 learning rate against log10 parameter count, the other parameters linear in log10
parameter count, a t prediction interval), the settings predicted for the standard sizes that
no analysed search covers: the bundled ladder's models (exact parameter counts) and one
representative model per guide bucket, each clipped to its bucket's documented range. With
three or more searched sizes, the leave-one-size-out error says how well the trends predicted
each searched size from the others. Only when the results hold two or more sizes.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from analysis.load import Results
from analysis.tables import fmt, md_table
from simpo_ray.transfer import finished, trends as transfer
from simpo_ray.errors import UserError
from simpo_ray.guide import PARAMS
from simpo_ray.transfer.model_size import bundled_param_count, format_count

# One representative per guide bucket: the model of the project's own search space for that
# bucket (search_spaces/<bucket>.yaml) and its parameter count (that space's
# estimate.params_billion).
REPRESENTATIVES: tuple[tuple[str, str, float], ...] = (
    ("1b-3b", "meta-llama/Llama-3.2-3B-Instruct", 3.21e9),
    ("7b-8b", "mistralai/Mistral-7B-v0.1", 7.24e9),
    ("8b-13b", "meta-llama/Meta-Llama-3-8B-Instruct", 8.03e9),
    ("13b-30b", "Qwen/Qwen2.5-14B-Instruct", 14.7e9),
    ("70b+", "meta-llama/Llama-3.1-70B-Instruct", 70.6e9),
)
BUNDLED = ("tiny", "small", "base")
# low/high: the interval clipped to the documented range; the documented range itself where the
# trend has no interval (`interval` False: two sizes leave no degrees of freedom between sizes).
COLUMNS = ["size", "model", "n_params", "parameter", "predicted", "low", "high", "interval", "raw_predicted", "note"]


def standard_sizes() -> list[tuple[str, str, float]]:
    """(size bucket, model, parameter count) of every standard size, smallest first."""
    return [("cpu", f"bundled:{s}", float(bundled_param_count(s))) for s in BUNDLED] + list(REPRESENTATIVES)


def unseen_sizes(searches: list[finished.FinishedSearch]) -> list[tuple[str, str, float]]:
    """Standard sizes without a search: a bundled model not searched, a guide bucket with none."""
    seen = {(s.size_bucket, s.model) for s in searches}
    buckets = {s.size_bucket for s in searches}
    return [(b, m, n) for b, m, n in standard_sizes()
            if (b, m) not in seen and (b == "cpu" or b not in buckets)]


def _preset(searches: list[finished.FinishedSearch], key: str) -> str | None:
    """The searches' task or model type when they share one (it sets the documented ranges)."""
    values = {getattr(s.record, key) for s in searches}
    return values.pop() if len(values) == 1 else None


def tables(results: Results, top_k: int = transfer.TOP_K) -> dict[str, Any]:
    """{} with fewer than two sizes; else `extrapolated` (one row per unseen size and parameter),
    `leave_one_size_out` (empty with fewer than three sizes) and `extrapolation` (trends, notes)."""
    if len(results.sizes) < 2:
        return {}
    searches = [finished.from_record(e.path, e.search, e.trials) for e in results.experiments]
    info: dict[str, Any] = {"trends": {}, "notes": [], "loso_note": "", "top_k": top_k}
    rows = []
    try:
        trends = transfer.fit_trends(searches, top_k)
    except UserError as e:
        info["notes"].append(f"not computed: {e}")
        trends = {}
    info["trends"] = trends
    task, model_type = _preset(searches, "task"), _preset(searches, "model_type")
    for bucket, model, n in unseen_sizes(searches) if trends else []:
        label = f"{bucket}/{transfer.short_name(model)}"
        for p, x in transfer.predict(trends, n, bucket, task=task, model_type=model_type).items():
            rows.append({"size": label, "model": model, "n_params": n, "parameter": p, "predicted": x.centre,
                         "low": x.low, "high": x.high, "interval": trends[p].has_interval,
                         "raw_predicted": x.raw[0], "note": x.note})
    loso = pd.DataFrame(columns=transfer.LOSO_COLUMNS)
    try:
        loso = transfer.leave_one_size_out(searches, top_k)
    except UserError as e:
        info["loso_note"] = str(e)
    return {"extrapolated": pd.DataFrame(rows, columns=COLUMNS), "leave_one_size_out": loso,
            "extrapolation": info}


def markdown(tables_: dict[str, Any]) -> list[str]:
    """The "Predicted for unseen sizes (extrapolated)" section ([] when there is none)."""
    if "extrapolation" not in tables_:
        return []
    info, pred, loso = tables_["extrapolation"], tables_["extrapolated"], tables_["leave_one_size_out"]
    out = ["## Predicted for unseen sizes (extrapolated)", ""]
    if info["notes"]:
        return out + [f"_{n}_" for n in info["notes"]] + [""]
    trends = info["trends"]
    used = next(iter(trends.values())).sizes if trends else ()
    out += [f"EXTRAPOLATED, not searched: each parameter's trend across the searched sizes "
            f"({', '.join(f'{s.label} {format_count(s.n_params)} parameters' for s in used)}; the top "
            f"{info['top_k']} trials of each, averaged: one optimum per size): log10 learning_rate against log10 "
            "parameter count (a power law), the other parameters linear in log10 parameter count; the interval is "
            "the 90% prediction interval of a size's optimum from the scatter between sizes (sizes - 2 degrees of "
            "freedom: none from two sizes), clipped to each bucket's documented range (⚠: the trend, "
            "shown after it, pointed outside). A guide bucket is represented by the model of the project's search space for it "
            "(search_spaces/<bucket>.yaml). A starting point for a search there, not a measured result.", ""]
    out += [f"- {t.formula()}, " + (f"residual sd {t.residual_sd:.3g} ({t.dof} dof)" if t.has_interval
                                     else transfer.no_interval(t)) for t in trends.values()] + [""]
    if len(pred):
        rows = []
        for size, r in pred.groupby("size", sort=False):
            r = r.set_index("parameter")
            row = {"size (extrapolated)": size, "model": r["model"].iloc[0],
                   "parameters": format_count(r["n_params"].iloc[0])}
            for p in PARAMS:
                interval = (f"[{fmt(r.at[p, 'low'], p)} – {fmt(r.at[p, 'high'], p)}]" if r.at[p, "interval"]
                            else "(no interval)") if p in r.index else ""
                row[p] = (f"{fmt(r.at[p, 'predicted'], p)} {interval}"
                          + (f" ⚠ trend {fmt(r.at[p, 'raw_predicted'], p)}" if r.at[p, "note"] else "")
                          if p in r.index else "n/a (not varied at two sizes)")
            rows.append(row)
        out += [md_table(pd.DataFrame(rows)), ""]
    else:
        out += ["_Every standard size was searched._", ""]
    out += ["Leave-one-size-out error (each searched size predicted from the others, unclipped, against "
            "its optimum, the mean of its top trials; learning_rate error in decades, log10 predicted/actual):", ""]
    if info["loso_note"]:
        return out + [f"_{info['loso_note']}._", ""]
    show = pd.DataFrame({
        "size": loso["size"], "parameter": loso["parameter"],
        "predicted": [f"{fmt(v, p)} [{fmt(lo, p)} – {fmt(hi, p)}]" if i is not None and i == i
                      else f"{fmt(v, p)} (no interval: two sizes)" for v, lo, hi, p, i in
                      zip(loso["predicted"], loso["low"], loso["high"], loso["parameter"], loso["inside"])],
        "actual optimum (best trial)": [f"{fmt(v, p)} ({fmt(b, p)})" for v, b, p in
                                        zip(loso["actual_optimum"], loso["actual_best"], loso["parameter"])],
        "error": [f"{e:+.3g}" + (" decades" if u == "decades" else "") for e, u in zip(loso["error"], loso["error_unit"])],
        "inside interval": ["n/a" if i is None or i != i else "yes" if i else "no" for i in loso["inside"]],
    })
    return out + [md_table(show), ""]
