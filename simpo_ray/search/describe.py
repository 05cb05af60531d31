"""The text of a search space beside the guide: what `--dry-run` prints first."""

from __future__ import annotations

from typing import TYPE_CHECKING

from simpo_ray import guide
from simpo_ray.search.objectives import describe as describe_objective

if TYPE_CHECKING:
    from simpo_ray.search.space import SearchSpace


def describe_space(space: SearchSpace) -> str:
    """The space as a table beside the guide's documented range, recommendation and default."""
    b = guide.bucket(space.size_bucket)
    default = space.documented_default()
    preset = f"task {space.task or '-'}, model type {space.model_type or '-'}"
    cfg = space.trial_config()
    lines = [f"Search space {space.name!r} ({space.source})",
             f"size bucket {space.size_bucket} (guide: {b.label}), {preset}",
             f"model {cfg.model_name_or_path}; data "
             + ", ".join(f"{k} ({v:g})" for k, v in cfg.dataset_mixer.items()), ""]
    rows = []
    for p in guide.PARAMS:
        if p in space.params:
            searched = str(space.params[p])
        else:
            src = "base" if p in space.base else "guide default"
            searched = f"fixed {space.fixed_params()[p]:g} ({src})"
        rows.append([p, searched, guide.format_range(space.documented_range(p)),
                     guide.format_range(space.recommended_range(p)), f"{default[p]:g}"])
    lines.append(guide.text_table(["parameter", "searched", "documented range", "guide recommends",
                               "guide default"], rows))
    lines.append("")
    eb, rec = space.effective_batch, guide.effective_batch_range(space.size_bucket)
    lines.append(f"effective batch: {cfg.per_device_train_batch_size} per device x "
                 f"{space.resources.num_workers} worker(s) x {cfg.gradient_accumulation_steps} "
                 f"accumulation = {eb}"
                 + (f" (guide recommends {rec[0]} to {rec[1]})" if rec else ""))
    r = space.resources
    lines.append(f"resources per trial: {r.num_workers} worker(s) x ({r.cpus_per_worker:g} CPU, "
                 f"{r.gpus_per_worker:g} GPU) = {r.gpus_per_trial:g} GPUs")
    s = space.search
    sched = s.scheduler if s.scheduler in ("fifo", "median") else (
        f"{s.scheduler} (time_attr {s.time_attr}, grace_period {s.grace_period}, "
        f"reduction_factor {s.reduction_factor:g}, max_t {s.max_t})")
    sampler = s.sampler
    if s.sampler == "tpe" and (s.tpe_multivariate is not None or s.tpe_startup_trials is not None):
        sampler += " (" + ", ".join(([] if s.tpe_multivariate is None else
                                     ["multivariate" if s.tpe_multivariate else "independent"]) + (
            [f"{s.tpe_startup_trials} start-up trials"] if s.tpe_startup_trials is not None else [])) + ")"
    lines.append(f"search: {s.num_samples} samples, objective {describe_objective(s)}, "
                 f"scheduler {sched}, sampler {sampler}, seed {s.seed}, max_concurrent "
                 f"{s.max_concurrent if s.max_concurrent is not None else 'auto'}")
    lines.append("points to evaluate (the first is the guide's documented default):")
    for i, (pt, label) in enumerate(zip(space.points_to_evaluate, space.point_labels), 1):
        lines.append(f"  {i}. {' '.join(f'{k}={v:g}' for k, v in pt.items())}  <- {label}")
    if space.notes:
        lines.append("notes:")
        lines.extend(f"  - {n}" for n in space.notes)
    return "\n".join(lines)
