"""A search's start points: the guide's documented default first, then the point a warm start
transferred from other model sizes (`simpo_ray.transfer.warm_start`), the SimPO reference's published
settings for the model family, the guide's reasoning example, and the user's extras."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from simpo_ray import guide, schema
from simpo_ray.errors import ConfigError
from simpo_ray.search.settings import PointsSpec

if TYPE_CHECKING:
    from simpo_ray.search.space import SearchSpace


def add_points(space: SearchSpace, spec: PointsSpec, model_name: str,
               transferred: list[tuple[str, dict[str, float]]] | None = None) -> None:
    """Fill points_to_evaluate: guide default first, then the warm start's `transferred` ((label,
    point of all four parameters), in order: `simpo_ray.transfer.warm_start`), references,
    reasoning example, extra."""
    searched = space.params
    fixed = space.fixed_params()
    default = space.documented_default()
    candidates: list[tuple[str, dict[str, float]]] = [
        (f"guide default ({space.size_bucket}, task {space.task or '-'}, "
         f"model type {space.model_type or '-'})", default)]
    candidates += transferred or []
    if spec.references:
        for ref in guide.reference_settings(model_name):
            candidates.append((f"SimPO reference {ref.name} ({ref.source.rsplit('/', 1)[-1]})", ref.params()))
        if space.task in guide.REASONING_TASKS:
            candidates.append(("guide example 'Llama 3 8B Instruct (Reasoning)': beta 5.0, "
                               "gamma_beta_ratio 0.7; lr and sft_weight from this space's default",
                               {**default, "beta": guide.REASONING_EXAMPLE["beta"],
                                "gamma_beta_ratio": guide.REASONING_EXAMPLE["gamma_beta_ratio"]}))
    for label, full in candidates:
        point = {}
        for p, param in searched.items():
            x = float(full[p])
            if not param.contains(x):
                c = param.clip(x)
                space.notes.append(f"{label}: {p} {x:g} is outside the searched {param}; clipped to {c:g}")
                x = c
            point[p] = x
        ignored = [f"{p} {full[p]:g}" for p in fixed if not math.isclose(full[p], fixed[p])]
        if ignored and label != candidates[0][0]:
            space.notes.append(f"{label}: {', '.join(ignored)} not used (fixed in this space)")
        _add_point(space, point, label)
    for i, raw in enumerate(spec.extra):
        fld = f"search.points_to_evaluate.extra[{i}]"
        schema.check_keys(raw, tuple(searched), fld + ".")
        point = {}
        for p, param in searched.items():
            # A parameter the point leaves out takes the first point's (the guide default's) value.
            x = schema.coerce(f"{fld}.{p}", raw[p], float) if p in raw else space.points_to_evaluate[0][p]
            if not param.contains(x):
                raise ConfigError(f"{fld}.{p}: {x:g} is outside the searched {param}")
            point[p] = x
        _add_point(space, point, f"extra point {i + 1} (search.points_to_evaluate)")


def _add_point(space: SearchSpace, point: dict[str, float], label: str) -> None:
    for j, existing in enumerate(space.points_to_evaluate):
        if all(math.isclose(point[k], existing[k], rel_tol=1e-9) for k in point):
            space.notes.append(f"{label}: same as point {j + 1} after clipping; dropped")
            return
    space.points_to_evaluate.append(point)
    space.point_labels.append(label)


