"""Warm start: finished searches applied to a new search's space (issue 14; no Ray here).

`apply_warm_start(space, spec, model)` runs inside `space.load_space` when `search.warm_start`
names finished searches (the space file's list, then `--warm-start`'s; paths relative to the
working directory, as every other path of a space, and recorded absolute). It

1. fits, per parameter, the trend against model size (`transfer.fit_trends`, all the given
   searches) and, with `search.warm_start_narrow`, narrows each searched range to the predicted
   interval (`transfer.narrowed_ranges`: inside the documented range unless
   `allow_out_of_range`; intersected with the space's own range: it never widens one);
2. fills the start points (`points.add_points`) right after the guide's documented default
   with what `search.warm_start_points` says: the `warm_start_top_k` best trials of the finished
   size nearest in parameter count (`top_k`, the default, labelled `top i of <size>`; zero-shot
   transfer by rank), the predicted point (`trend`, labelled `transferred from sizes ...`),
   `warm_start_prior_samples` points drawn around it (`prior`, `transfer.prior`, labelled
   `prior draw i of k`), or nothing (`none`);
3. takes the ranked trials of the same size bucket and model (`finished.same_size_trials`,
   inside the final ranges) for the searcher, which adds them to Optuna's study as COMPLETE
   trials (`tune.make_searcher`: `OptunaSearch.add_evaluated_point`), so they are not rerun. A start
   point that one of them already evaluated is dropped, except the documented default: it
   always runs first, this search's own baseline (`is_default` in trials.csv).

The result is `space.warm` (`WarmStart`): the trials, the lines `--dry-run` prints
(`transfer.describe` plus what was narrowed and enqueued) and the searches it came from, which
search.json records under `search.warm_started_from`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from simpo_ray.search import records
from simpo_ray.transfer import finished, prior, trends as transfer
from simpo_ray.errors import UserError
from simpo_ray.search.points import add_points
from simpo_ray.search.settings import DEFAULT_WARM_START_POINTS as DEFAULT_POINTS
from simpo_ray.transfer.model_size import format_count

if TYPE_CHECKING:
    from simpo_ray.search.settings import PointsSpec
    from simpo_ray.search.space import SearchSpace


@dataclass
class WarmStart:
    """What a warm start gave a space (kept small: the space travels to every trial)."""

    trials: list[tuple[dict[str, float], float]]  # (params, value) for the searcher, best first
    transferred: dict[str, float] | None          # the first transferred point as enqueued (None: none)
    sources: list[dict[str, Any]]                 # search.json's search.warm_started_from
    lines: list[str] = field(default_factory=list)  # what --dry-run prints

    def summary(self) -> str:
        used = ", ".join(s["size"] for s in self.sources)
        point = "transferred point(s) enqueued after the default" if self.transferred else "no transferred point"
        return f"warm start from {len(self.sources)} finished search(es) ({used}): {len(self.trials)} " \
               f"finished trial(s) handed to the searcher, {point}"


def apply_warm_start(space: SearchSpace, spec: PointsSpec, model_name: str) -> WarmStart:
    """Apply `space.search.warm_start` to `space` (module docstring); sets and returns `space.warm`."""
    try:
        searches = finished.load_finished(space.search.warm_start)
    except UserError as e:
        raise UserError(f"warm start: {e}") from None
    target = (space.size_bucket, str(model_name))
    lines: list[str] = []
    try:
        trends = transfer.fit_trends(searches)
    except UserError:
        trends = {}  # transfer.describe says why
    n, _ = transfer.target_params(space)
    predicted, label = None, ""
    if trends and n is not None:
        kw = dict(task=space.task, model_type=space.model_type, allow_out_of_range=space.allow_out_of_range)
        if space.search.warm_start_narrow:
            if not any(t.has_interval for t in trends.values()):
                some = next(iter(trends.values()))
                raise UserError(f"search.warm_start_narrow: the size trends have no interval to narrow to: "
                                f"{transfer.no_interval(some)}; warm-start from searches of three sizes or "
                                "more, or drop --warm-start-narrow")
            notes: list[str] = []
            ranges = transfer.narrowed_ranges(trends, n, space.size_bucket, notes=notes, **kw)
            lines += ["search ranges narrowed to the predicted intervals (search.warm_start_narrow):"]
            kept = {p for p in ranges if any(x.startswith(f"{p}: ") for x in notes)}  # documented range kept
            lines += [f"  {x}" for x in notes + _narrow(space, {p: r for p, r in ranges.items() if p not in kept})]
        sizes = dict.fromkeys(f.label for t in trends.values() for f in t.sizes)
        label = f"transferred from sizes {', '.join(sizes)} (size trends at {format_count(n)} parameters)"
        predicted = {**space.documented_default(), **transfer.predict_point(trends, n, space.size_bucket, **kw)}
    elif space.search.warm_start_narrow:
        lines.append("search.warm_start_narrow: ranges not narrowed (no size trend to predict from)")
    how = space.search.warm_start_points or DEFAULT_POINTS
    if how == "top_k":
        transferred = _top_k(searches, space, target, n, space.search.warm_start_top_k, lines)
    elif how == "prior":
        transferred = _prior(trends, space, n, lines) if predicted else []
        if not predicted:
            why = "this model's parameter count is unknown" if trends and n is None else "no size trend"
            lines.append(f"search.warm_start_points prior: nothing to draw around ({why}); nothing transferred")
    else:
        transferred = [(label, predicted)] if predicted and how == "trend" else []
    add_points(space, spec, model_name, transferred=transferred)
    trials = [({p: float(space.params[p].clip(v)) for p, v in point.items()}, value)
              for point, value in finished.same_size_trials(searches, space)]
    lines += _drop_evaluated(space, trials)
    enqueued = None
    for name, _ in transferred:
        if name in space.point_labels:
            i = space.point_labels.index(name)
            enqueued = enqueued or space.points_to_evaluate[i]
            lines.append(f"{name}: enqueued as point {i + 1} of {len(space.points_to_evaluate)}: "
                         + " ".join(f"{k}={v:.3g}" for k, v in space.points_to_evaluate[i].items()))
        else:
            lines.append(f"{name}: not enqueued (see above and the notes)")
    if predicted and how not in ("trend", "prior"):
        lines.append(f"the size trends' point is not enqueued (search.warm_start_points: {how})")
    other = sorted({f"{s.objective} ({s.mode})" for s in searches if (s.size_bucket, s.model) != target}
                   - {f"{space.search.objective} ({space.search.mode})"})
    if other and trends:
        lines.append(f"note: the size trends rank trials by {other[0]}; this search optimises "
                     f"{space.search.objective}")
    in_trend = {f.label for t in trends.values() for f in t.sizes}
    sources = [{"name": s.name, "path": str(s.path.resolve()), "size": s.label, "n_params": s.n_params,
                "same_size": (s.size_bucket, s.model) == target, "in_trend": s.label in in_trend}
               for s in searches]
    space.warm = WarmStart(trials, enqueued, sources)
    space.warm.lines = transfer.describe(searches, space) + lines
    return space.warm


def _top_k(searches, space: SearchSpace, target: tuple[str, str], n: float | None, k: int,
           lines: list[str]) -> list[tuple[str, dict[str, float]]]:
    """The `k` best finished trials of the finished size (another than this one) nearest `n`
    parameters, its searches pooled, best first, as full points (a parameter a search did not
    vary: its fixed value, else this space's documented default)."""
    others = [s for s in searches if (s.size_bucket, s.model) != target and s.n_params]
    if not others or n is None:
        lines.append("search.warm_start_points top_k: no finished search of another size with a known "
                     "parameter count" + ("" if n is not None else ", or this model's count is unknown")
                     + "; nothing transferred")
        return []
    nearest = min(others, key=lambda s: (abs(math.log(s.n_params / n)), -s.n_params))
    group = [s for s in others if (s.size_bucket, s.model) == (nearest.size_bucket, nearest.model)]
    default = space.documented_default()
    # the searches of that size pooled and ranked together; each trial read as
    # finished.same_size_trials reads one (FinishedSearch.value), this space's default where
    # its search recorded no value
    pooled = pd.concat([s.trials.assign(_search=i) for i, s in enumerate(group)], ignore_index=True)
    out = []
    for i, (_, row) in enumerate(records.ranked(pooled, nearest.mode).head(k).iterrows()):
        s = group[int(row["_search"])]
        point = {p: default[p] if (v := s.value(row, p)) is None else v for p in default}
        out.append((f"top {i + 1} of {nearest.label} ({nearest.objective} {row['best_objective']:.4g})", point))
    searches_text = "" if len(group) == 1 else f", {len(group)} searches pooled"
    lines.append(f"search.warm_start_points top_k: the {len(out)} best trial(s) of {nearest.label} "
                 f"({format_count(nearest.n_params)} parameters, the finished size nearest this one{searches_text})")
    return out


def _prior(trends, space: SearchSpace, n: float, lines: list[str]) -> list[tuple[str, dict[str, float]]]:
    """`warm_start_prior_samples` points drawn around the trends' point (`transfer.prior`), as
    full points (a parameter this space does not search: its documented default)."""
    k = space.search.warm_start_prior_samples
    found = prior.priors(trends, n, space.size_bucket, space.params, task=space.task, model_type=space.model_type,
                         allow_out_of_range=space.allow_out_of_range)
    lines.append(f"search.warm_start_points prior: {k} point(s) drawn (seed {space.search.seed}) from, per "
                 "searched parameter:")
    lines += [f"  {found[p].describe(param)}" for p, param in space.params.items()]
    default = space.documented_default()
    return [(f"prior draw {i + 1} of {k} (around the size trends' point)", {**default, **point})
            for i, point in enumerate(prior.draw(found, space.params, k, space.search.seed))]


def _narrow(space: SearchSpace, ranges: dict[str, tuple[float, float]]) -> list[str]:
    """Replace each searched parameter's range by its intersection with `ranges`; one line each."""
    from simpo_ray import guide
    from simpo_ray.search.settings import Param

    out = []
    for p, (lo, hi) in ranges.items():
        old = space.params.get(p)
        if old is None:
            continue
        if old.values is not None:
            kept = tuple(v for v in old.values if v in guide.Range(lo, hi))
            new = Param(p, old.distribution, min(kept), max(kept), kept) if kept else None
        else:
            low, high = max(old.low, lo), min(old.high, hi)
            new = Param(p, old.distribution, low, high) if low < high else None
        if new is None:
            out.append(f"{p}: the interval [{lo:.3g}, {hi:.3g}] leaves nothing of the searched {old}; not narrowed")
        elif new != old:
            space.params[p] = new
            out.append(f"{p}: {old} -> {new}")
        else:
            out.append(f"{p}: {old} (inside the interval [{lo:.3g}, {hi:.3g}] already)")
    return out


def _drop_evaluated(space: SearchSpace, trials: list[tuple[dict[str, float], float]]) -> list[str]:
    """Drop the start points (all but the documented default) that a warm trial evaluated."""
    out = []

    def evaluated(point: dict[str, float]) -> float | None:
        for params, value in trials:
            if all(math.isclose(point[k], params[k], rel_tol=1e-9, abs_tol=1e-15) for k in point):
                return value
        return None

    for i in reversed(range(len(space.points_to_evaluate))):
        value = evaluated(space.points_to_evaluate[i])
        if value is None:
            continue
        label = space.point_labels[i]
        if i == 0:
            out.append(f"{label}: a warm-start trial has it ({space.search.objective} {value:.4g}); it still "
                       "runs first, as this search's baseline")
            continue
        del space.points_to_evaluate[i], space.point_labels[i]
        out.append(f"{label}: evaluated by a warm-start trial ({space.search.objective} {value:.4g}); "
                   "dropped from the points to evaluate")
    return out[::-1]
