"""Tables that answer "which SimPO hyperparameters for this model size, and how sure are we".

Definitions (also printed at the top of recommendations.md):
- A trial's *score* is its best objective value over the run (step 0 excluded), the value its
  kept checkpoint and the search's `best_config.yaml` match; `final_score` is the last
  reported value. Trials rank as the search ranks them (`simpo_ray.search.records.ranked`): only
  `completed` or `stopped_early` trials with a finite score; ties go to the better final
  value, then the longer run, then the trial id. So the best trial here is the search's.
- *Recommended* value: the best trial's value.
- *Robust range*: min-max of the parameter over the top trials, the best
  `max(min_top, ceil(top_frac * n_finished))` finished trials (top quartile, at least 3);
  `support` says how many trials that is.
- *Guide*: the documented default and the guide's recommended ("optimal"/"standard") range for
  the size bucket, task and model type, and its documented envelope (`simpo_ray.guide`).
- *Flag*: the recommended value lies outside the guide's recommended range
  (`above guide` / `below guide`) or even outside the documented envelope (`above documented
  range` / `below documented range`); ` (all top trials)` is added when the whole robust range
  lies on that side too.
- *Generation quality* (trials run with a reward model): the final (last report's) reward win
  rate, length-controlled win rate and mean generated length (`QUALITY`), shown beside the
  score wherever some trial reported them (`quality_columns`), and a warning line under the best
  trial when most of its final generations were cut at `max_new_tokens` or length alone separated
  its wins from its losses (`simpo_ray.train.generation_checks`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from analysis.load import Results, slug
from analysis.tables import (MIN_TOP, TOP_FRAC, best_trial, cross_size_display, fmt, fmt_range, guide, md_table,
                             quality_text, recommendation_display, top_trials)
from analysis import extrapolate
from analysis.diagnose import LENGTH_RULE
from analysis.quality import pareto_markdown, quality_columns
from simpo_ray.errors import UserError
from simpo_ray.guide import PARAMS
from simpo_ray.config import FIELDS, from_dict
from simpo_ray.search.records import RANKED_STATUSES, STATUSES
from simpo_ray.train.generation_checks import final_values, warning_line

MIN_IMPORTANCE_TRIALS = 4  # fANOVA on fewer finished trials says nothing


def size_info(results: Results, size: str) -> dict[str, Any]:
    t = results.of_size(size)
    return {
        "size": size,
        "size_bucket": t["size_bucket"].iloc[0],
        "model": t["model"].iloc[0],
        "task": ", ".join(sorted(t["task"].astype(str).unique())),
        "model_type": ", ".join(sorted(t["model_type"].astype(str).unique())),
        "searches": ", ".join(sorted(t["experiment"].unique())),
    }


def status_counts(results: Results) -> pd.DataFrame:
    """Trials by status for each size (known statuses first, then any other), with a total."""
    t = results.trials
    table = pd.crosstab(t["size"], t["status"])
    cols = [s for s in STATUSES] + sorted(c for c in table.columns if c not in STATUSES)
    table = table.reindex(columns=cols, fill_value=0).reindex(results.sizes)
    table["total"] = table.sum(axis=1)
    table.columns.name = None
    return table.reset_index()


def recommendations(results: Results, top_frac: float = TOP_FRAC, min_top: int = MIN_TOP) -> pd.DataFrame:
    """One row per (size, parameter): recommended value, robust range, the guide, a flag."""
    rows = []
    for size in results.sizes:
        best = best_trial(results, size)
        top = top_trials(results, size, top_frac, min_top)
        g = guide(results, size)
        n = len(results.ranked(size))
        for p in PARAMS:
            if p not in top.columns:
                continue
            lo, hi = float(top[p].min()), float(top[p].max())
            gp = g[p]
            rows.append({
                "size": size, "parameter": p, "recommended": float(best[p]),
                "robust_low": lo, "robust_high": hi, "support": len(top), "n_finished": n,
                "guide_default": gp["default"], "guide_low": gp["low"], "guide_high": gp["high"],
                "documented_low": gp["doc_low"], "documented_high": gp["doc_high"],
                "flag": flag(float(best[p]), lo, hi, gp),
            })
    return pd.DataFrame(rows)


def flag(value: float, lo: float, hi: float, g: dict[str, float]) -> str:
    """How the recommended `value` (robust range [lo, hi]) departs from the guide; '' if not."""
    for side_lo, side_hi, name in ((g["doc_low"], g["doc_high"], "documented range"), (g["low"], g["high"], "guide")):
        if math.isnan(side_lo) or math.isnan(side_hi):
            continue
        tol = 1e-9 * max(abs(side_lo), abs(side_hi), 1e-300)
        if value > side_hi + tol:
            return f"above {name}" + (" (all top trials)" if lo > side_hi + tol else "")
        if value < side_lo - tol:
            return f"below {name}" + (" (all top trials)" if hi < side_lo - tol else "")
    return ""


def best_vs_default(results: Results) -> pd.DataFrame:
    """The best trial's score against the documented-default trial's (`is_default`); the final
    values beside them."""
    rows, quality = [], quality_columns(results.trials)
    for size in results.sizes:
        best = best_trial(results, size)
        defaults = results.of_size(size)
        defaults = defaults[defaults["is_default"]]
        row = {"size": size, "best_trial": best["trial_id"], "best_score": float(best["score"]),
               "best_final_score": float(best["final_score"]), "best_status": best["status"],
               "default_trial": None, "default_status": None, "default_score": float("nan"),
               "default_final_score": float("nan"), "improvement": float("nan"),
               **{f"{who}_final_{n}": float("nan") for n in quality.values() for who in ("best", "default")}}
        row.update({f"best_final_{n}": float(best[c]) for c, n in quality.items()})
        if len(defaults):
            d = defaults.iloc[0]
            row.update(default_trial=d["trial_id"], default_status=d["status"],
                       default_score=float(d["score"]), default_final_score=float(d["final_score"]),
                       **{f"default_final_{n}": float(d[c]) for c, n in quality.items()})
            sign = 1.0 if results.mode == "max" else -1.0
            row["improvement"] = sign * (row["best_score"] - row["default_score"]) + 0.0  # no -0
        rows.append(row)
    return pd.DataFrame(rows)


def cross_size(results: Results) -> pd.DataFrame:
    """Rows = sizes (smallest first); columns = recommended value and the guide's default and
    range per parameter: how the optimum moves with model size, beside the guide's tables."""
    rec = recommendations(results)
    rows = []
    for size in results.sizes:
        info = size_info(results, size)
        row = {"size": size, "size_bucket": info["size_bucket"], "model": info["model"]}
        r = rec[rec["size"] == size].set_index("parameter")
        for p in r.index:
            row[p] = r.at[p, "recommended"]
            row[f"{p} guide"] = r.at[p, "guide_default"]
            row[f"{p} guide range"] = fmt_range(r.at[p, "guide_low"], r.at[p, "guide_high"], p)
        best = best_trial(results, size)
        row["score"], row["final_score"] = float(best["score"]), float(best["final_score"])
        row.update({f"final_{n}": float(best[c]) for c, n in quality_columns(results.trials).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def importance(results: Results, seed: int = 0) -> tuple[pd.DataFrame, dict[str, str]]:
    """fANOVA importance of each searched parameter for the objective, per size.

    Built on an in-memory Optuna study of the finished trials (`optuna.trial.create_trial`)
    with the search's own distributions. Returns (table: size, parameter, importance) and
    notes per size where it could not be computed.
    """
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows, notes = [], {}
    for size in results.sizes:
        fin = results.ranked(size)
        dists = _distributions(results, size, fin)
        if len(fin) < MIN_IMPORTANCE_TRIALS:
            notes[size] = (f"not computed: {len(fin)} finished trial(s), fANOVA needs at least "
                           f"{MIN_IMPORTANCE_TRIALS}")
            continue
        if not dists:
            notes[size] = "not computed: no parameter took two different values"
            continue
        study = optuna.create_study(direction="maximize" if results.mode == "max" else "minimize")
        for _, t in fin.iterrows():
            params = {p: (t[p] if isinstance(d, optuna.distributions.CategoricalDistribution) else float(t[p]))
                      for p, d in dists.items()}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(t["score"])))
        try:
            imp = optuna.importance.get_param_importances(
                study, evaluator=FanovaImportanceEvaluator(seed=seed), params=list(dists))
        except ImportError:  # Optuna's fANOVA fits scikit-learn random forests
            notes[size] = "not computed: fANOVA needs scikit-learn (pip install scikit-learn)"
            continue
        except (ValueError, RuntimeError) as e:
            notes[size] = f"not computed: {str(e).splitlines()[0]}"
            continue
        for p, v in imp.items():
            rows.append({"size": size, "parameter": p, "importance": float(v), "n_trials": len(fin)})
        if len(fin) < 20:
            notes[size] = f"indicative only: {len(fin)} finished trials"
    return pd.DataFrame(rows, columns=["size", "parameter", "importance", "n_trials"]), notes


def _distributions(results: Results, size: str, fin: pd.DataFrame) -> dict:
    """The search space's distribution for each parameter that varied among `fin`."""
    import optuna.distributions as od

    space: dict[str, dict] = {}
    for name in fin["experiment"].unique():
        space.update(results.experiment(name).search.params)
    dists = {}
    for p in results.searched_params(size):
        values = fin[p].dropna()
        if values.nunique() < 2 or len(values) < len(fin):
            continue
        spec = space.get(p) or {}
        kind = str(spec.get("distribution", "")).lower()
        if kind == "choice" or not pd.api.types.is_numeric_dtype(values):
            choices = list(spec.get("values") or sorted(values.unique(), key=str))
            choices = [c.item() if hasattr(c, "item") else c for c in choices]
            dists[p] = od.CategoricalDistribution(choices)
            continue
        lo = min(float(spec.get("low", values.min())), float(values.min()))
        hi = max(float(spec.get("high", values.max())), float(values.max()))
        log = kind in ("loguniform", "log_uniform", "log") and lo > 0
        dists[p] = od.FloatDistribution(lo, hi, log=log)
    return dists


def export_config(results: Results, size: str) -> tuple[str | None, str]:
    """The best trial of a size as a training-config YAML in the guide's key names.

    The search wrote `best_config.yaml` for this same trial (one ranking, `simpo_ray.search.records`);
    this takes its keys, sets every searched parameter to the best trial's value (they agree)
    and validates the result with `simpo_ray.config.from_dict`. Returns (yaml text or None, a note).
    """
    best = best_trial(results, size)
    exp = results.experiment(best["experiment"])
    origin = "best_config.yaml"
    if exp.best_config is None:
        return None, f"not exported: {exp.path} has no readable best_config.yaml"
    data = dict(exp.best_config)
    for p in results.searched_params(size):
        if p in FIELDS and pd.notna(best.get(p)):
            v = best[p]
            data[p] = v.item() if hasattr(v, "item") else v
    try:
        cfg = from_dict(data, source=f"{exp.path} best trial {best['trial_id']}")
    except UserError as e:
        return None, f"not exported: {e}"
    valid = cfg.to_dict()
    keys = [k for k in data if k in valid]
    header = (f"# SimPO training config: best trial {best['trial_id']} of search {exp.name} "
              f"({results.objective} = {best['score']:.4g}),\n# from its {origin}. "
              "Run: python -m simpo_ray.train --config THIS_FILE\n")
    return header + yaml.safe_dump({k: valid[k] for k in keys}, sort_keys=False), f"from {origin}"


# ---------------------------------------------------------------- markdown


def trials_table(results: Results) -> pd.DataFrame:
    """Every trial: per size the ranked ones first (best first), then the rest; configuration,
    status, score, final score and the final generation-quality metrics that were reported."""
    quality = quality_columns(results.trials)
    params = [p for s in results.sizes for p in results.searched_params(s)]
    cols = ["size", "trial_id", "status", "is_default", *params, "steps", "score", "final_score", *quality]
    order = dict.fromkeys(i for s in results.sizes for i in [*results.ranked(s).index, *results.of_size(s).index])
    t = results.trials.loc[list(order), list(dict.fromkeys(c for c in cols if c in results.trials))]
    return t.rename(columns={c: f"final_{n}" for c, n in quality.items()})


def markdown(results: Results, tables: dict[str, Any], diagnostics: pd.DataFrame,
             plots: dict[str, list[str]], configs: dict[str, tuple[str | None, str]]) -> str:
    """recommendations.md: the definitions, the cross-size table, then one section per size."""
    rec, bvd, counts = tables["recommendations"], tables["best_vs_default"], tables["status_counts"]
    imp, imp_notes = tables["importance"], tables["importance_notes"]
    sign = "higher" if results.mode == "max" else "lower"
    quality = quality_columns(results.trials)
    out = [
        "# SimPO hyperparameter recommendations", "",
        f"Objective: `{results.objective}` ({sign} is better), from "
        + ", ".join(f"`{e.path}`" for e in results.experiments) + ".", "",
        *[f"**Partial results** from `{e.path}`: {e.partial}." for e in results.experiments if e.partial],
        *([""] if any(e.partial for e in results.experiments) else []),
        "How to read this:",
        "- A trial's *score* is its best objective value over the run (step 0 excluded; its kept checkpoint "
        f"and the search's best_config.yaml match it); only {' and '.join(RANKED_STATUSES)} trials rank, "
        "ties going to the better final value (*final score*), then the longer run. This is the search's own ranking.",
        "- *Recommended*: the best trial's value. *Robust range*: min–max over the top trials "
        f"(the best quarter of finished trials, at least {MIN_TOP}); \"top k of n\" says how many support it.",
        "- *Guide*: the guide's documented default and recommended range for the size bucket, task "
        "and model type; *documented range*: the widest range it still calls usable (simpo_ray.guide).",
        "- *Flag*: the recommendation lies outside the guide's range (or even the documented range); "
        "\"(all top trials)\": so does the whole robust range.",
        *(["- *Win rate*: share of held-out prompts whose generated answer the reward model scores above the "
           "baseline answer (ties count half); *LC win rate*: the same, length-controlled (AlpacaEval 2 style, "
           "read at zero length difference); *gen length*: mean generated tokens. Final values: the trial's "
           "last report."] if quality else []), "",
        "## Across sizes", "",
        md_table(cross_size_display(tables["cross_size"])), "",
        "![cross_size](plots/cross_size.png)", "",
    ]
    out += extrapolate.markdown(tables)
    for size in results.sizes:
        info = size_info(results, size)
        b = bvd[bvd["size"] == size].iloc[0]
        out += [f"## {size}", "",
                f"Model `{info['model']}`, size bucket `{info['size_bucket']}`, task {info['task']}, "
                f"model type {info['model_type']}; search(es): {info['searches']}.", "",
                md_table(recommendation_display(rec, size)), ""]
        t = results.of_size(size)
        default = t[t["is_default"]].iloc[0] if b["default_trial"] is not None else None
        line = (f"Best trial `{b['best_trial']}` ({b['best_status']}): {results.objective} = {fmt(b['best_score'])}"
                f" (final {fmt(b['best_final_score'])}{quality_text(best_trial(results, size), quality)})")
        if b["default_trial"] is not None:
            line += (f"; documented-default trial `{b['default_trial']}` ({b['default_status']}): "
                     f"{fmt(b['default_score'])} (final {fmt(b['default_final_score'])}"
                     f"{quality_text(default, quality)})")
            if pd.notna(b["improvement"]):
                line += f"; improvement {b['improvement']:+.4g}"
        else:
            line += "; no documented-default trial (`is_default`) in this search"
        out += [line + ".", ""]
        warning = warning_line(final_values(best_trial(results, size)))
        if warning:  # the final win rates just shown cannot be read as they are
            out += [f"⚠ Best trial `{b['best_trial']}`'s final model: {warning}.", ""]
        out += pareto_markdown(results, size, fmt)
        if quality:
            top = trials_table(results).loc[top_trials(results, size).index].drop(columns="size")
            out += ["Top trials, with the generation quality of their final model:", "",
                    md_table(top.apply(lambda col: [fmt(v, col.name) for v in col])), ""]
        c = counts[counts["size"] == size].drop(columns="size")
        out += ["Trials by status:", "", md_table(c), ""]
        out += ["Parameter importance (fANOVA):", ""]
        i = imp[imp["size"] == size]
        if len(i):
            out += ["| parameter | importance |", "|---|---|"]
            out += [f"| {p} | {v:.2f} |" for p, v in zip(i["parameter"], i["importance"])]
            out += [""]
        if size in imp_notes:
            out += [f"_{imp_notes[size]}_", ""]
        d = diagnostics[diagnostics["size"] == size]
        out += ["Diagnostics (the guide's Step 3 applied to the measured curves):", ""]
        if len(d):
            out += [f"- **{r.check}** ({r.n_trials} trial(s)): {r.finding} → {r.advice}" for r in d.itertuples()]
        elif quality:
        
            out += [f"- no divergence, plateau, flat margin, forgetting or length exploitation ({LENGTH_RULE}) "
                    "detected."]
        else:
            out += ["- no divergence, plateau, flat margin or forgetting detected."]
        out += [""]
        text, note = configs.get(size, (None, "not exported"))
        if text is not None:
            out += [f"Best configuration: [`configs/{slug(size)}.yaml`](configs/{slug(size)}.yaml) ({note}).", ""]
        else:
            out += [f"Best configuration: {note}.", ""]
        for p in plots.get(size, []):
            out += [f"![{Path(p).stem}]({p})"]
        out += [""]
    return "\n".join(out).rstrip() + "\n"


def write_tables(results: Results, out: Path) -> dict[str, Any]:
    """Compute every table and write the CSVs into `out`; return the tables."""
    imp, notes = importance(results)
    tables = {
        "recommendations": recommendations(results),
        "cross_size": cross_size(results),
        "best_vs_default": best_vs_default(results),
        "status_counts": status_counts(results),
        "importance": imp,
        "importance_notes": notes,
    }

    tables.update(extrapolate.tables(results))  # predicted for unseen sizes: with two sizes or more
    for name, df in tables.items():
        if isinstance(df, pd.DataFrame):
            df.to_csv(out / f"{name}.csv", index=False)
    results.trials.to_csv(out / "all_trials.csv", index=False)
    return tables
