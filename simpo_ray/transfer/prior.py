"""The size trends' prediction as a prior: a new search's first trials drawn around it
(`search.warm_start_points: prior`, in the spirit of piBO / PriorBand). No Ray here.

Per searched parameter with a trend (`trends.fit_trends`), a normal in the trend's scale (log10
for the learning rate), truncated to the searched range, centred on the predicted centre
(`trends.predict`: clipped to the documented range), with standard deviation sqrt(w^2 + e^2):

- w, how wide the good region is at the searched sizes: the root mean square of the sizes'
  top-trial spreads (`SizeFit.spread`; a size with one top trial has none and is left out);
- e, the extrapolation's error: the prediction's standard error where the trend has an interval
  (three sizes or more: `Trend.prediction_se`). Two sizes leave no scatter between sizes to
  estimate it from; e is then the step the (unclipped) prediction took from the nearest searched
  size's optimum, an assumption that `--dry-run` states (a prediction far from every searched size
  gets a wide prior, one close to a searched size a narrow one).

A searched parameter without a trend (varied at fewer than two sizes) is drawn from its searched
range, as the searcher's own random start draws it (log-uniform, uniform, or one of a choice's
values). Parameters are drawn independently: the learning rate's trade-off with beta is not
modelled. The draws are enqueued after the documented default; the searcher then proposes as it
always does (unlike piBO, the prior does not weight its later proposals). `draw` is seeded by
`search.seed`, so a search and its resume enqueue the same points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from simpo_ray.transfer.trends import Trend, predict

if TYPE_CHECKING:
    from simpo_ray.search.settings import Param


@dataclass(frozen=True)
class Prior:
    """One parameter's prior: a truncated normal in the trend's scale, or (no trend) the range."""

    param: str
    log_value: bool | None  # None: no trend, drawn from the searched range
    centre: float = math.nan   # in the trend's scale (log10 for the learning rate)
    sd: float = math.nan
    width: float = math.nan    # w (module docstring)
    error: float = math.nan    # e
    error_from: str = ""       # what e is: the prediction's standard error, or the step it took

    def describe(self, param: Param) -> str:
        if self.log_value is None:
            return f"{self.param}: no size trend; drawn from the searched {param}"
        scale = f"log10 {self.param}" if self.log_value else self.param
        return (f"{self.param}: {scale} ~ normal({self.centre:.3g}, sd {self.sd:.2g}) inside the searched "
                f"{param} (top trials' spread {self.width:.2g}; {self.error_from} {self.error:.2g})")


def priors(trends: Mapping[str, Trend], n_params: float, bucket: str, params: Mapping[str, Param], *,
           task: str | None = None, model_type: str | None = None,
           allow_out_of_range: bool = False) -> dict[str, Prior]:
    """The prior of each searched parameter at `n_params` (module docstring)."""
    predicted = predict(trends, n_params, bucket, task=task, model_type=model_type,
                        allow_out_of_range=allow_out_of_range)
    out = {}
    for p in params:
        trend = trends.get(p)
        if trend is None:
            out[p] = Prior(p, None)
            continue
        to_scale = math.log10 if trend.log_value else float
        centre = to_scale(predicted[p].centre)
        spreads = [f.spread for f in trend.sizes if f.n > 1]
        width = math.sqrt(sum(s * s for s in spreads) / len(spreads)) if spreads else 0.0
        if trend.has_interval:
            error, source = trend.prediction_se(n_params), "the prediction's standard error"
        else:
            x0 = math.log10(n_params)
            nearest = min(trend.sizes, key=lambda f: abs(math.log10(f.n_params) - x0))
            error = abs(trend.intercept + trend.slope * x0 - nearest.centre)
            source = f"the step from {nearest.label}'s optimum (no interval from {trend.weight} sizes)"
        out[p] = Prior(p, trend.log_value, centre, math.hypot(width, error), width, error, source)
    return out


def draw(priors_: Mapping[str, Prior], params: Mapping[str, Param], k: int, seed: int) -> list[dict[str, float]]:
    """`k` points, each searched parameter drawn from its prior inside its searched range (a
    choice: its value nearest the draw); the same `seed` gives the same points."""
    from scipy.stats import truncnorm

    rng = np.random.default_rng(seed)
    points: list[dict[str, float]] = [{} for _ in range(k)]
    for p, param in params.items():
        prior = priors_[p]
        if prior.log_value is None:
            values = _from_range(param, k, rng)
        else:
            to_scale = (lambda v: math.log10(v)) if prior.log_value else float
            lo, hi = to_scale(param.low), to_scale(param.high)
            centre = min(max(prior.centre, lo), hi) if math.isfinite(prior.centre) else (
                hi if prior.centre > 0 else lo)  # an infinite extrapolation (allow_out_of_range)
            if math.isfinite(prior.centre) and math.isfinite(prior.sd) and prior.sd > 0 and lo < hi:
                a, b = (lo - prior.centre) / prior.sd, (hi - prior.centre) / prior.sd
                y = truncnorm.rvs(a, b, loc=prior.centre, scale=prior.sd, size=k, random_state=rng)
                y = np.where(np.isfinite(y), y, centre)
            else:
                y = np.full(k, centre)
            values = [_nearest(param, v, prior.log_value) for v in np.clip(y, lo, hi)]
        for point, v in zip(points, values):
            point[p] = float(v)
    return points


def _nearest(param: Param, y: float, log_value: bool) -> float:
    """A draw `y` in the trend's scale as a value of `param` (a choice: its value nearest in that scale)."""
    if param.values is not None:
        return float(min(param.values, key=lambda v: abs((math.log10(v) if log_value else v) - y)))
    return float(param.clip(10.0 ** y if log_value else y))


def _from_range(param: Param, k: int, rng: np.random.Generator) -> list[float]:
    if param.values is not None:
        return [float(v) for v in rng.choice(param.values, size=k)]
    if param.distribution == "loguniform":
        return list(10.0 ** rng.uniform(math.log10(param.low), math.log10(param.high), k))
    return list(rng.uniform(param.low, param.high, k))
