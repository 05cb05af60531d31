"""Figures of a search, one set per size. Each function returns a `matplotlib.figure.Figure`
built without pyplot, so the CLI renders it with Agg and a notebook shows it inline."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.diagnose import trial_flags
from analysis.load import Results, slug
from analysis.report import recommendations
from simpo_ray.search.objectives import non_dominated
from analysis.quality import BASELINE_LENGTH, GEN_LENGTH, WIN, WIN_LC
from analysis.tables import best_trial, guide, top_trials
from simpo_ray.guide import PARAMS
from simpo_ray.search.records import STATUSES

STATUS_COLORS = dict(zip(STATUSES, ("tab:green", "tab:orange", "tab:red", "tab:gray")))
ACCURACY = "eval/preference_accuracy"
CHOSEN_NLL = "eval/sft_loss"


def _color(status: str) -> str:
    return STATUS_COLORS.get(status, "tab:purple")


def objective_vs_params(results: Results, size: str) -> Figure:
    """Score of every finished trial against each parameter; the guide's range shaded."""
    t = results.of_size(size)
    params = [p for p in PARAMS if p in t.columns]
    g = guide(results, size)
    best = best_trial(results, size)
    fig = Figure(figsize=(3.6 * len(params), 3.4), layout="constrained")
    axes = fig.subplots(1, len(params), sharey=True, squeeze=False)[0]
    fin = results.ranked(size)
    for ax, p in zip(axes, params):
        lo, hi = g[p]["low"], g[p]["high"]
        if np.isfinite(lo) and np.isfinite(hi):
            ax.axvspan(lo, hi if hi > lo else lo * 1.02 + 1e-12, color="tab:blue", alpha=0.12, label="guide range")
        for status, s in fin.groupby("status"):
            ax.scatter(s[p], s["score"], color=_color(status), label=status, s=28, alpha=0.85)
        d = fin[fin["is_default"]]
        if len(d):
            ax.scatter(d[p], d["score"], facecolors="none", edgecolors="black", s=90, marker="s", label="documented default")
        ax.scatter([best[p]], [best["score"]], marker="*", s=200, color="gold", edgecolors="black", zorder=5, label="best")
        if p == "learning_rate" and (t[p] > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel(p)
    axes[0].set_ylabel(results.objective)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(),
               loc="outside right upper", fontsize=8)
    fig.suptitle(f"{size}: {results.objective} against each parameter ({len(fin)} finished trials)")
    return fig


def learning_curves(results: Results, size: str) -> Figure:
    """Objective and training loss over steps, one line per trial, coloured by ASHA's outcome."""
    t = results.of_size(size)
    c = results.curves[results.curves["size"] == size]
    panels = [m for m in (results.objective, "loss") if m in c.columns]
    fig = Figure(figsize=(6 * max(len(panels), 1), 3.8), layout="constrained")
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    status = dict(zip(zip(t["experiment"], t["trial_id"]), t["status"]))
    for ax, metric in zip(axes, panels):
        for (exp, tid), curve in c.groupby(["experiment", "trial_id"]):
            s = status.get((exp, tid), "unknown")
            curve = curve.dropna(subset=[metric]).sort_values("step")
            ax.plot(curve["step"], curve[metric], color=_color(s), alpha=0.8, lw=1.3, marker="." if len(curve) < 8 else None)
        for r in sorted({r for e in t["experiment"].unique() for r in results.rungs.get(e, [])}):
            ax.axvline(r, color="black", lw=0.5, ls=":", alpha=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
    counts = t["status"].value_counts()
    for s in counts.index:
        axes[0].plot([], [], color=_color(s), label=f"{s} ({counts[s]})")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{size}: learning curves by outcome (dotted: scheduler rungs)")
    return fig


def parallel_coordinates(results: Results, size: str) -> Figure:
    """Top trials (the robust range's support) across the four parameters, coloured by score;
    other finished trials in grey. Each axis spans the search's range (log for learning_rate)."""
    fin = results.ranked(size)
    top = top_trials(results, size)
    params = [p for p in PARAMS if p in fin.columns]
    space = {}
    for e in fin["experiment"].unique():
        space.update(results.experiment(e).search.params)
    bounds = {}
    for p in params:
        spec = space.get(p) or {}
        lo = min(float(spec.get("low", fin[p].min())), fin[p].min())
        hi = max(float(spec.get("high", fin[p].max())), fin[p].max())
        log = p == "learning_rate" and lo > 0
        bounds[p] = (lo, hi, log)

    def norm(p: str, v: pd.Series) -> np.ndarray:
        lo, hi, log = bounds[p]
        v, lo, hi = (np.log10(v), np.log10(lo), np.log10(hi)) if log else (v, lo, hi)
        return np.asarray((v - lo) / (hi - lo) if hi > lo else v * 0 + 0.5, dtype=float)

    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(params))
    others = fin.drop(top.index)
    for _, r in others.iterrows():
        ax.plot(x, [norm(p, pd.Series([r[p]]))[0] for p in params], color="lightgray", lw=1)
    cmap = matplotlib.colormaps["viridis"]
    s = top["score"].astype(float)
    span = (s.max() - s.min()) or 1.0
    for _, r in top.iloc[::-1].iterrows():
        frac = (r["score"] - s.min()) / span
        ax.plot(x, [norm(p, pd.Series([r[p]]))[0] for p in params], color=cmap(frac if results.mode == "max" else 1 - frac),
                lw=2.2, marker="o", label=f"{r['trial_id']}: {r['score']:.3g}")
    for i, p in enumerate(params):
        lo, hi, log = bounds[p]
        ax.axvline(i, color="black", lw=0.8)
        fmt = (lambda v: f"{v:.1e}") if log else (lambda v: f"{v:.3g}")
        ax.text(i, -0.06, fmt(lo), ha="center", va="top", fontsize=8)
        ax.text(i, 1.06, fmt(hi), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, params)
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    ax.legend(title=f"top {len(top)} ({results.objective})", fontsize=8, title_fontsize=8,
              loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"{size}: top {len(top)} of {len(fin)} finished trials")
    return fig


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Points not dominated when lower `x` and higher `y` are better (`objectives.non_dominated`),
    sorted by `x`."""
    return points[non_dominated(points, [(x, "min"), (y, "max")])].sort_values(x)


def tradeoff(results: Results, size: str) -> Figure | None:
    """Preference accuracy against chosen NLL at the end of each trial, with the Pareto front:
    the alignment gained against the likelihood of the chosen answers lost (forgetting)."""
    t = results.of_size(size)
    x, y = f"final_{CHOSEN_NLL}", f"final_{ACCURACY}"
    if x not in t.columns or y not in t.columns:
        return None
    pts = t[t["status"] != "errored"].dropna(subset=[x, y])
    if pts.empty:
        return None
    front = pareto_front(pts[pts["status"] == "completed"], x, y)  # a stopped trial's values are of an earlier step
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    for status, s in pts.groupby("status"):
        sc = ax.scatter(s[x], s[y], c=s["sft_weight"] if "sft_weight" in s else None, cmap="viridis",
                        vmin=pts["sft_weight"].min(), vmax=max(pts["sft_weight"].max(), 1e-9),
                        edgecolors=_color(status), linewidths=1.5, s=45, label=status)
    ax.step(front[x], front[y], where="post", color="black", lw=1.2, label="Pareto front")
    ax.scatter(front[x], front[y], facecolors="none", edgecolors="black", s=120)
    fig.colorbar(sc, ax=ax, label="sft_weight")
    ax.set_xlabel(f"chosen NLL ({CHOSEN_NLL}, lower = less forgetting)")
    ax.set_ylabel(f"preference accuracy ({ACCURACY})")
    ax.legend(fontsize=8, title="edge: status", title_fontsize=8)
    fig.suptitle(f"{size}: alignment / forgetting trade-off ({len(front)} on the front)")
    return fig


def objective_vs_length(results: Results, size: str) -> Figure | None:
    """Each finished trial's final objective, and its final LC and raw reward win rates where
    reported, against its final mean generated length (`eval/gen_length`); dashed: the baseline
    answers' length, dotted: a win rate of 0.5 (parity with the baseline); ringed in red: the
    trials `diagnose` flags for length exploitation (raw win rate up, LC win rate flat, longer
    answers). None when the trials report no generated length (no reward model)."""

    x = f"final_{GEN_LENGTH}"
    fin = results.ranked(size)
    if x not in fin.columns:
        return None
    fin = fin[pd.to_numeric(fin[x], errors="coerce").notna()]
    if fin.empty:
        return None
    panels = [("final_score", f"{results.objective} (final)")] + [
        (f"final_{m}", f"{m} (final)") for m in (WIN_LC, WIN)
        if m != results.objective and f"final_{m}" in fin.columns and fin[f"final_{m}"].notna().any()]
    base = fin.get(f"final_{BASELINE_LENGTH}", pd.Series(dtype=float)).dropna()
    best = best_trial(results, size)
    flags = trial_flags(results)
    flagged = fin.merge(flags[flags["length_exploitation"]][["experiment", "trial_id"]])
    fig = Figure(figsize=(4.4 * len(panels), 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), sharex=True, squeeze=False)[0]
    for ax, (col, label) in zip(axes, panels):
        for status, s in fin.groupby("status"):
            ax.scatter(s[x], s[col], color=_color(status), label=status, s=28, alpha=0.85)
        ax.scatter([best[x]], [best[col]], marker="*", s=200, color="gold", edgecolors="black", zorder=5, label="best")
        if len(flagged):
            ax.scatter(flagged[x], flagged[col], facecolors="none", edgecolors="tab:red", s=130, linewidths=1.5,
                       label="length exploitation")
        if len(base):
            ax.axvline(base.median(), color="black", ls="--", lw=1, label=f"baseline length ({base.median():.3g})")
        if col != "final_score" or results.objective in (WIN, WIN_LC):
            ax.axhline(0.5, color="gray", ls=":", lw=1, label="win rate 0.5 (parity)")
        ax.set_xlabel(f"mean generated tokens ({GEN_LENGTH}, final)")
        ax.set_ylabel(label)
    legend = {lab: h for ax in axes for h, lab in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc="outside right upper", fontsize=8)
    fig.suptitle(f"{size}: final scores against answer length ({len(fin)} finished trials)")
    return fig


def cross_size(results: Results) -> Figure:
    """Per parameter: the recommended value (dot) and robust range (bar) of each size, smallest
    first, over the guide's range (grey band) and default (x): how the optimum moves with size."""
    rec = recommendations(results)
    sizes = results.sizes
    fig = Figure(figsize=(3.4 * len(PARAMS), 3.6), layout="constrained")
    axes = fig.subplots(1, len(PARAMS), squeeze=False)[0]
    for ax, p in zip(axes, PARAMS):
        r = rec[rec["parameter"] == p].set_index("size").reindex(sizes)
        x = np.arange(len(sizes))
        ax.bar(x, r["guide_high"] - r["guide_low"], bottom=r["guide_low"], width=0.6, color="lightgray",
               label="guide range")
        ax.scatter(x, r["guide_default"], marker="x", color="black", label="guide default", zorder=3)
        ax.errorbar(x, r["recommended"], yerr=[r["recommended"] - r["robust_low"], r["robust_high"] - r["recommended"]],
                    fmt="o", color="tab:blue", capsize=4, label="recommended (robust range)", zorder=4)
        if p == "learning_rate":
            ax.set_yscale("log")
        ax.use_sticky_edges = False  # bars would pin the axis to the guide's range
        ax.margins(y=0.08)
        ax.set_xticks(x, sizes, rotation=20)
        ax.set_title(p)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle("Recommended values by model size, against the guide")
    return fig


FIGURES = {
    "objective_vs_params": objective_vs_params,
    "learning_curves": learning_curves,
    "parallel_top_trials": parallel_coordinates,
    "accuracy_vs_nll": tradeoff,
    "objective_vs_length": objective_vs_length,  # with a reward model only
}


def save_all(results: Results, out: Path) -> dict[str, list[str]]:
    """Write every figure of every size as PNG under `out/plots`; paths relative to `out`."""
    (out / "plots").mkdir(parents=True, exist_ok=True)
    written: dict[str, list[str]] = {}
    for size in results.sizes:
        for name, make in FIGURES.items():
            fig = make(results, size)
            if fig is None:
                continue
            rel = f"plots/{slug(size)}_{name}.png"
            fig.savefig(out / rel, dpi=110)
            written.setdefault(size, []).append(rel)
    cross_size(results).savefig(out / "plots" / "cross_size.png", dpi=110)
    return written
