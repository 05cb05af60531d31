"""Trends across model sizes from finished searches (`transfer.finished`).

`fit_trends` fits, per parameter, a line against log10 of the
parameter count N: log10(learning_rate) (a power law, exponent = slope), and beta,
gamma_beta_ratio, sft_weight linear in log10 N (bounded, and moved little by size in the guide:
a power law would claim more than the data hold). `predict`/`predict_point` clip the predictions
to the target's documented range, `narrowed_ranges` intersects them with it, `describe` prints
all for `--dry-run`, `leave_one_size_out` measures the method on the searched sizes.

The fit: one optimum per size, the mean of its top `top_k` ranked trials (`records.ranked`;
fewer when fewer rank; their spread is kept beside it), and a line through the S sizes' optima.
Not the top trials as independent points: TPE's top trials cluster around one optimum, so their
spread is not the uncertainty of that optimum, and counting them as observations claimed
2 * top_k - 2 degrees of freedom from two sizes. The residual sd `s` is the optima's scatter about
the line, between sizes; the interval is the t prediction interval of a size's optimum,
`centre +- t(level, S - 2) * s * sqrt(1 + 1/S + (x0 - mean x)^2 / Sxx)`: none with two sizes
(0 degrees of freedom: `Trend.has_interval` is False, and `--warm-start-narrow` is refused),
t = 6.31 at 90% with three; wider farther from the searched sizes. Its coverage is tested on
planted trends (tests/test_transfer.py). Several searches (seeds) of one size are pooled before
its top trials are taken. No bootstrap over trials or seeds: from three sizes on, the optima's
scatter about the line already holds each optimum's own noise (which trials and seeds a size
drew), so resampling them would count it twice; from two sizes a bootstrap would measure only
that noise, not how far sizes' optima stray from a line, which no number of trials or seeds at
two sizes can tell. No Ray here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from simpo_ray import guide
from simpo_ray.search import records
from simpo_ray.errors import UserError
from simpo_ray.guide import PARAMS
from simpo_ray.transfer.model_size import format_count, param_count, short_name
from simpo_ray.transfer.finished import FinishedSearch, same_size_trials

if TYPE_CHECKING:
    from simpo_ray.search.settings import Param
    from simpo_ray.search.space import SearchSpace

TOP_K = 5          # top trials per size that feed a trend
LEVEL = 0.9        # prediction-interval coverage
LOG_PARAMS = ("learning_rate",)  # fitted as log10(value); the others as the value itself
LOSO_COLUMNS = ["size", "model", "n_params", "parameter", "predicted", "low", "high", "actual_optimum",
                "actual_best", "error", "error_unit", "inside"]


# ---------------------------------------------------------------- the same size: trials to continue from


# ---------------------------------------------------------------- trends across sizes

@dataclass(frozen=True)
class SizeFit:
    """One size's contribution to a trend: its top trials' mean and spread (log10 for lr)."""

    label: str
    n_params: float
    n: int
    centre: float
    spread: float


@dataclass(frozen=True)
class Trend:
    """y = intercept + slope * log10(N), y = log10(value) for learning_rate, else the value."""

    param: str
    log_value: bool
    slope: float       # per decade of parameters; for learning_rate the power-law exponent
    intercept: float   # y at N = 1
    sizes: tuple[SizeFit, ...]
    residual_sd: float  # the sizes' optima's scatter about the line (nan when dof < 1)
    dof: int           # sizes - 2
    x_mean: float      # mean of the sizes' log10 N
    sxx: float         # sum over sizes of (log10 N - x_mean)^2
    level: float = LEVEL

    @property
    def weight(self) -> int:
        """How many points the line is fitted on: one optimum per size."""
        return len(self.sizes)

    @property
    def has_interval(self) -> bool:
        return self.dof >= 1 and math.isfinite(self.residual_sd)

    def _value(self, y: float) -> float:
        return (10.0 ** y if y < 300 else math.inf) if self.log_value else y

    def predict(self, n_params: float) -> tuple[float, float, float]:
        """(centre, low, high) at `n_params`, unclipped (low/high infinite when dof < 1)."""
        from scipy.special import stdtrit

        y = self.intercept + self.slope * math.log10(n_params)
        if not self.has_interval:
            half = math.inf
        else:
            half = float(stdtrit(self.dof, (1 + self.level) / 2)) * self.prediction_se(n_params)
        return self._value(y), self._value(y - half), self._value(y + half)

    def prediction_se(self, n_params: float) -> float:
        """The standard error of a new size's optimum at `n_params` (in the fitted scale; nan
        without an interval): s * sqrt(1 + 1/S + (x0 - mean x)^2 / Sxx)."""
        if not self.has_interval:
            return math.nan
        x0 = math.log10(n_params)
        return self.residual_sd * math.sqrt(1 + 1 / self.weight + (x0 - self.x_mean) ** 2 / self.sxx)

    def formula(self) -> str:
        y = f"log10 {self.param}" if self.log_value else self.param
        slope = 0.0 if abs(self.slope) < 1e-12 else self.slope  # float noise of a flat trend
        text = f"{y} = {slope:+.3g} * log10 N {self.intercept:+.3g}"
        return text + (f" (power law, exponent {slope:.3g})" if self.log_value else " (per decade)")


def _size_groups(searches: Iterable[FinishedSearch]) -> dict[tuple[str, str], list[FinishedSearch]]:
    """Searches by size (bucket and model), smallest model first."""
    groups: dict[tuple[str, str], list[FinishedSearch]] = {}
    for s in searches:
        groups.setdefault((s.size_bucket, s.model), []).append(s)
    return dict(sorted(groups.items(), key=lambda kv: (kv[1][0].n_params or math.inf, kv[0])))


def _size_fit(group: list[FinishedSearch], param: str, top_k: int,
              cache: dict[tuple[int, ...], pd.DataFrame]) -> tuple[SizeFit, np.ndarray] | None:
    """The top trials of one size for one parameter (searches that varied it only)."""
    varied = [s for s in group if param in s.searched]
    if not varied:
        return None
    key = tuple(map(id, varied))  # the same searches rank once for every parameter
    if key not in cache:
        cache[key] = records.ranked(pd.concat([s.trials for s in varied], ignore_index=True),
                                    varied[0].mode).head(top_k)
    top = cache[key]
    y = top[param].to_numpy(dtype=float)
    y = np.log10(y) if param in LOG_PARAMS else y
    y = y[np.isfinite(y)]
    if not len(y):
        return None
    spread = float(np.std(y, ddof=1)) if len(y) > 1 else 0.0
    return SizeFit(varied[0].label, float(varied[0].n_params), len(y), float(y.mean()), spread), y


def fit_trends(searches: Iterable[FinishedSearch], top_k: int = TOP_K, level: float = LEVEL) -> dict[str, Trend]:
    """Per parameter, its trend against log10 of the parameter count (module docstring).

    A parameter varied at fewer than two sizes gets no trend. `UserError` when the searches
    hold one model size only, or a size whose parameter count is unknown."""
    groups = _size_groups(searches)
    for group in groups.values():
        if group[0].n_params is None:
            raise UserError(f"{group[0].path}: parameter count of {group[0].model} {group[0].params_source}; "
                            "cannot place it on a size trend")
    counts = {g[0].n_params for g in groups.values()}
    if len(counts) < 2:
        what = ", ".join(f"{g[0].label}, {format_count(g[0].n_params)} parameters" for g in groups.values())
        raise UserError(f"cannot extrapolate from one model size ({what or 'no search'}); give searches "
                        "of at least two sizes")
    trends, cache = {}, {}
    for p in PARAMS:
        fits = [f for f in (_size_fit(g, p, top_k, cache) for g in groups.values()) if f is not None]
        if len({f.n_params for f, _ in fits}) < 2:
            continue
        x = np.array([math.log10(f.n_params) for f, _ in fits])
        y = np.array([f.centre for f, _ in fits])  # one optimum per size
        x_mean, sxx = float(x.mean()), float(((x - x.mean()) ** 2).sum())
        slope = float(((x - x_mean) * (y - y.mean())).sum() / sxx)
        intercept = float(y.mean() - slope * x_mean)
        dof = len(y) - 2
        rss = float(((y - intercept - slope * x) ** 2).sum())
        sd = math.sqrt(rss / dof) if dof > 0 else math.nan
        trends[p] = Trend(p, p in LOG_PARAMS, slope, intercept, tuple(f for f, _ in fits), sd, dof,
                          x_mean, sxx, level)
    return trends


# ---------------------------------------------------------------- predictions for a size

@dataclass(frozen=True)
class Predicted:
    """A parameter's prediction at a size: clipped centre and interval, the raw ones, a note."""

    param: str
    centre: float
    low: float
    high: float
    raw: tuple[float, float, float]
    note: str = ""


def predict(trends: Mapping[str, Trend], n_params: float, bucket: str, *, task: str | None = None,
            model_type: str | None = None, allow_out_of_range: bool = False) -> dict[str, Predicted]:
    """Each trend's prediction at `n_params`, clipped to the documented range of `bucket` (and
    preset) unless `allow_out_of_range`; the note says what was clipped."""
    out = {}
    for p, trend in trends.items():
        centre, low, high = raw = trend.predict(n_params)
        note = ""
        if not allow_out_of_range:
            lo, hi = guide.documented_range(p, bucket, task, model_type)
            clip = lambda v: min(max(v, lo), hi)  # noqa: E731
            if not lo <= centre <= hi:
                note = f"centre {centre:.3g} clipped to the documented range [{lo:g}, {hi:g}]"
            centre, low, high = clip(centre), clip(low), clip(high)
        out[p] = Predicted(p, centre, low, high, raw, note)
    return out


def predict_point(trends: Mapping[str, Trend], n_params: float, bucket: str, *, task: str | None = None,
                  model_type: str | None = None, allow_out_of_range: bool = False,
                  params: Mapping[str, Param] | None = None,
                  default: Mapping[str, float] | None = None) -> dict[str, float]:
    """The point to enqueue: each predicted centre (`predict`). With `params` (a space's searched
    parameters) only those, each clipped into its range (a choice to its nearest value), a
    parameter without a trend taking `default`'s value (e.g. the guide default point)."""
    centres = {p: x.centre for p, x in predict(trends, n_params, bucket, task=task, model_type=model_type,
                                               allow_out_of_range=allow_out_of_range).items()}
    if params is None:
        return centres
    out = {}
    for p, param in params.items():
        if p in centres:
            out[p] = float(param.clip(centres[p]))
        elif default is not None and p in default:
            out[p] = float(default[p])
    return out


def narrowed_ranges(trends: Mapping[str, Trend], n_params: float, bucket: str, *, task: str | None = None,
                    model_type: str | None = None, allow_out_of_range: bool = False,
                    notes: list[str] | None = None) -> dict[str, tuple[float, float]]:
    """Per parameter, the predicted interval intersected with the documented range (the interval
    alone with `allow_out_of_range`). Where that leaves no range to search (the interval lies
    outside the documented range, or has no width) the documented range is kept, with a note."""
    notes = notes if notes is not None else []
    out = {}
    for p, x in predict(trends, n_params, bucket, task=task, model_type=model_type,
                        allow_out_of_range=allow_out_of_range).items():
        doc = guide.documented_range(p, bucket, task, model_type)
        if not trends[p].has_interval:
            notes.append(f"{p}: {no_interval(trends[p])}; not narrowed")
            out[p] = doc
            continue
        _, raw_low, raw_high = x.raw
        low, high = (raw_low, raw_high) if allow_out_of_range else (max(raw_low, doc[0]), min(raw_high, doc[1]))
        if not (math.isfinite(low) and math.isfinite(high) and low < high and (low > 0 or p not in LOG_PARAMS)):
            notes.append(f"{p}: predicted interval [{raw_low:.3g}, {raw_high:.3g}] leaves no range inside "
                         f"the documented [{doc[0]:g}, {doc[1]:g}]; not narrowed")
            low, high = doc
        out[p] = (low, high)
    return out


def no_interval(trend: Trend) -> str:
    return (f"no interval from {trend.weight} sizes (one optimum each leaves {trend.dof} degrees of freedom "
            "between sizes; a third size gives one)")


def interval_text(x: Predicted, trend: Trend) -> str:
    """`[low, high]`, or why there is none."""
    return f"[{x.low:.3g}, {x.high:.3g}]" if trend.has_interval else f"(no interval: {trend.weight} sizes)"


def target_params(space: SearchSpace) -> tuple[float | None, str]:
    """The parameter count of a space's model (`param_count`, with its estimate)."""
    return param_count(str(space.trial_config().model_name_or_path),
                       space.estimate.params_billion if space.estimate else None)


def describe(searches: list[FinishedSearch], space: SearchSpace, *, top_k: int = TOP_K,
             level: float = LEVEL) -> list[str]:
    """What a warm start from `searches` gives `space`, for `--dry-run`: the trials handed over,
    the trend per parameter (slope, intercept, the sizes and their trial counts) and the
    predicted point with its interval."""
    notes: list[str] = []
    warm = same_size_trials(searches, space, notes)
    model = str(space.trial_config().model_name_or_path)
    same = [s.name for s in searches if (s.size_bucket, s.model) == (space.size_bucket, model)]
    lines = [f"warm start: {len(warm)} finished trial(s) of {space.size_bucket}/{short_name(model)} handed "
             f"to the searcher" + (f" (from {', '.join(same)})" if same else " (no search of this size and model)")]
    lines += [f"  {n}" for n in notes]
    try:
        trends = fit_trends(searches, top_k, level)
    except UserError as e:
        return lines + [f"trend across sizes: not fitted: {e}"]
    n, source = target_params(space)
    lines.append(f"trend across sizes (one optimum per size: the mean of its top {top_k} trials; "
                 f"{level:.0%} prediction interval from the scatter between sizes):")
    for t in trends.values():
        used = ", ".join(f"{f.label} {format_count(f.n_params)} (n={f.n}, spread {f.spread:.2g})" for f in t.sizes)
        sd = f"residual sd {t.residual_sd:.3g} ({t.dof} dof)" if t.has_interval else "no residual (2 sizes)"
        lines.append(f"  {t.formula()}; sizes: {used}; {sd}")
    if not trends:
        lines.append("  no parameter was varied at two sizes")
    lines += [f"  {no_interval(t)}" for t in list(trends.values())[:1] if not t.has_interval]
    if n is None:
        return lines + [f"predicted point: none: parameter count {source}"]
    lines.append(f"predicted point for {space.size_bucket}/{short_name(model)} ({format_count(n)} parameters, "
                 f"{source}):")
    for p, x in predict(trends, n, space.size_bucket, task=space.task, model_type=space.model_type,
                        allow_out_of_range=space.allow_out_of_range).items():
        lines.append(f"  {p} {x.centre:.3g} {interval_text(x, trends[p])}" + (f" ({x.note})" if x.note else ""))
    return lines


# ---------------------------------------------------------------- how well it predicts

def leave_one_size_out(searches: Iterable[FinishedSearch], top_k: int = TOP_K, level: float = LEVEL) -> pd.DataFrame:
    """Per searched size and parameter: the prediction from the other sizes (unclipped) against
    that size's optimum (`actual_optimum`: the mean of its top trials, what the interval predicts;
    its single best trial beside it). `error` is log10(predicted / optimum) for learning_rate
    (decades), predicted - optimum for the others; `inside`: the actual best lies in the interval (None where
    the other sizes give no interval: two of them).
    `UserError` with fewer than three sizes."""
    searches = list(searches)
    groups = _size_groups(searches)
    if len({g[0].n_params for g in groups.values()}) < 3:
        raise UserError(f"leave-one-size-out needs searches of at least three sizes (have {len(groups)})")
    rows = []
    for key, group in groups.items():
        try:
            trends = fit_trends([s for s in searches if (s.size_bucket, s.model) != key], top_k, level)
        except UserError:
            continue
        best = records.best_trial(pd.concat([s.trials for s in group], ignore_index=True), group[0].mode)
        for p, t in trends.items():
            own = _size_fit(group, p, top_k, {})  # the held-out size's optimum: what the interval predicts
            if own is None:
                continue
            centre, low, high = t.predict(group[0].n_params)
            actual = 10.0 ** own[0].centre if t.log_value else own[0].centre
            error = math.log10(centre / actual) if t.log_value and actual > 0 else centre - actual
            rows.append({"size": group[0].label, "model": group[0].model, "n_params": group[0].n_params,
                         "parameter": p, "predicted": centre, "low": low, "high": high, "actual_optimum": actual,
                         "actual_best": float(best[p]),
                         "error": error, "error_unit": "decades" if t.log_value else "absolute",
                         # no interval from two sizes: "inside" would be true of anything
                         "inside": bool(low <= actual <= high) if t.has_interval else None})
    return pd.DataFrame(rows, columns=LOSO_COLUMNS)

