"""A search's plan before anything runs: the space loaded and resolved (`load`: the pure
loader's `SearchSpace`, then its start points and warm start, `resolve`), where its results go
(`storage_root`, `experiment_path`), the memory plan of one trial, and `dry_run`'s description.
No Ray is started unless an address is given."""

from __future__ import annotations

import os
from typing import Any

from simpo_ray.errors import UserError
from simpo_ray.io import Storage, check_name
from simpo_ray.search import disk
from simpo_ray.search.describe import describe_space
from simpo_ray.search.estimate import estimate_gpu_hours
from simpo_ray.train.memory import plan_for
from simpo_ray.infra import cluster
from simpo_ray.search.points import add_points
from simpo_ray.search.space import SearchSpace, load_space
from simpo_ray.transfer.warm_start import apply_warm_start


def load(space_path: str | os.PathLike, *, task=None, model_type=None, allow_out_of_range=False,
         num_samples=None, seed=None, scheduler=None, sampler=None, max_concurrent=None, overrides=None,
         warm_start=None, warm_start_narrow=None, optuna_storage=None):
    """The validated space with command-line values applied on top of the YAML's (`warm_start`:
    finished-search directories added after the space's `search.warm_start`)."""
    flat = dict(overrides or {})
    for key, value in (("num_samples", num_samples), ("seed", seed), ("scheduler", scheduler),
                       ("sampler", sampler), ("max_concurrent", max_concurrent),
                       ("warm_start_narrow", warm_start_narrow), ("optuna_storage", optuna_storage)):
        if value is not None:
            flat[f"search.{key}"] = value
    return resolve(load_space(space_path, task=task, model_type=model_type,
                              allow_out_of_range=allow_out_of_range, overrides=flat or None,
                              warm_start=tuple(warm_start or ())))


def resolve(space: SearchSpace) -> SearchSpace:
    """The search's planning step on a loaded space (`load_space` reads nothing but the YAML):
    its start points (the documented default first, then references and `extra`,
    `search.add_points`) or, when `search.warm_start` names finished searches, the warm start
    (`transfer.warm_start.apply_warm_start`: reads them from disk, may narrow the ranges, adds
    the transferred point, keeps same-size trials for the searcher). Idempotent."""
    if space.resolved:
        return space
    _default_lengths(space)
    model = space.trial_config().model_name_or_path
    if space.search.warm_start:
        apply_warm_start(space, space.search.points_to_evaluate, model)
    else:
        add_points(space, space.search.points_to_evaluate, model)
    n = space.search.num_samples
    if n < len(space.points_to_evaluate):
        space.notes.append(f"search.num_samples {n} is below the {len(space.points_to_evaluate)} "
                           f"points to evaluate; only the first {n} run")
    space.resolved = True
    return space


def _default_lengths(space: SearchSpace) -> None:
    """A base without max_length gets a training config's default (`config.default_lengths`: the
    smaller of 1024 and the model's position limit) when the model's own config reads without a
    download; a note says so. Else the run's check refuses a max_length above the limit."""
    if "max_length" in space.base:
        return
    from simpo_ray.config import default_lengths
    from simpo_ray.train.model import position_limit
    from simpo_ray.train.reference_models import config_for

    cfg = space.trial_config()
    try:
        config, source = config_for(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code,
                                    revision=cfg.model_revision)
    except (KeyError, UserError):
        return
    if source != f"the config of {cfg.model_name_or_path}":  # a family's public config: not its limit
        return
    resolved, note = default_lengths(cfg, position_limit(config), prompt_given="max_prompt_length" in space.base)
    if note:
        space.base.update(max_length=resolved.max_length, max_prompt_length=resolved.max_prompt_length)
        space.notes.append(f"base.{note}")


def loaded(space: SearchSpace | str | os.PathLike, load_options: dict[str, Any]) -> SearchSpace:
    """`space` resolved when already loaded (then `load_options` must be unset), else `load(space, ...)`."""
    if not isinstance(space, SearchSpace):
        return load(space, **load_options)
    given = sorted(k for k, v in load_options.items() if v not in (None, False))
    if given:
        raise TypeError(f"{', '.join(given)}: pass these to tune.load(), not with a loaded SearchSpace")
    return resolve(space)


RATE_OBJECTIVES = ("eval/success_rate", "eval/reward_win_rate", "eval/reward_win_rate_lc")
TARGET_SE = 0.03


# The LC win rate's standard error over the raw share's bound 0.5/sqrt(n): about 0.075 measured at
# 64 generated prompts (issue 23) against 0.0625, i.e. 1.2x (its fit adds the length term's noise).
LC_SE_FACTOR = 1.2


def _objective_noise(space: SearchSpace) -> list[str]:
    """[one line] for a rate measured on generated answers: its standard error at the first rung
    (a rate near 0.5 over n prompts: 0.5 / sqrt(n), the binomial's largest; the LC win rate's
    `LC_SE_FACTOR` times that) and the prompts that would bring it under TARGET_SE, and what one
    evaluation generates (prompts per worker, batches of up to max_new_tokens decoding steps)."""
    import math

    cfg, s = space.default_config(), space.search
    n = min(cfg.generation_eval_samples, cfg.max_eval_samples or cfg.generation_eval_samples)
    if s.objective not in RATE_OBJECTIVES or n <= 0:
        return []
    lc = s.objective.endswith("_lc")
    factor = LC_SE_FACTOR if lc else 1.0
    se, need = factor * 0.5 / math.sqrt(n), math.ceil((factor * 0.5 / TARGET_SE) ** 2)
    rung = (f"the first {s.scheduler} rung ({s.time_attr} {s.grace_period})"
            if s.scheduler in ("asha", "hyperband", "median") else "each evaluation")
    more = (f"; {need} prompts would bring it under {TARGET_SE} ({need / n:.1f}x the generation per evaluation)"
            if se > TARGET_SE + 5e-4 else "")
    how = (f"{LC_SE_FACTOR:g} x 0.5/sqrt(n), the LC fit's measured excess over the raw share's bound; "
           "each report bootstraps its own (_se)") if lc else "0.5/sqrt(n)"
    per_worker = math.ceil(n / space.resources.num_workers)
    rounds = math.ceil(per_worker / (cfg.generation_batch_size or per_worker))
    tokens = f" of up to {cfg.max_new_tokens} new tokens" if cfg.max_new_tokens else ""
    return [f"objective noise: {s.objective} over {n} generated prompts has a standard error of about {se:.3f} "
            f"({how}) at {rung}{more}; each evaluation generates {per_worker} answers per worker in "
            f"{rounds} batch(es){tokens}"]


def dry_run(space: SearchSpace | str | os.PathLike, *, address=None, storage_path=None, name=None,
            **load_options) -> tuple[str, list[str]]:
    """Validate the space against the cluster and describe the plan; starts no trial. Returns
    (the description, what the real run would refuse: one line each).

    Refused as the run refuses them: a trial whose memory plan does not fit its GPUs, a model,
    tokenizer or dataset that cannot be found (a missing local path, a Hub name the Hub or the
    offline cache cannot give), `max_length` above the model's position limit, and, with an
    address, a trial the cluster cannot hold. Without an address (or RAY_ADDRESS) it inspects
    this machine (no Ray started) and a trial that does not fit here is only described, so a
    laptop can check a 70B space before booking the cluster it needs.
    """
    space = loaded(space, load_options)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        target, where = cluster.init_ray(address, reap_orphans=False), f"Ray cluster at {address}"
    else:
        target, where = cluster.ClusterInfo.local(), "this machine; pass --address to check a cluster"
    lines = [describe_space(space), ""]
    for note in space.notes:
        lines.append(f"note: {note}")
    if space.warm is not None:  # transfer.describe: trials handed over, trends, the predicted point
        lines += space.warm.lines
    lines.append(f"cluster ({where}): {target.cpus:g} CPU, {target.gpus:g} GPU on {len(target.nodes)} node(s)")
    refusals: list[str] = []
    slots = 1
    try:
        slots = cluster.plan_concurrency(target, space.resources, space.search.max_concurrent)
        lines.append(f"concurrency: {slots} trial(s) at once; {space.search.num_samples} trials in "
                     f"about {-(-space.search.num_samples // slots)} wave(s) before early stopping")
    except UserError as e:
        lines.append(f"does not fit this cluster: {e}")
        if address:
            refusals.append(f"the cluster at {address} cannot hold a trial: {e}")
    lines += _objective_noise(space)
    lines.append(disk.describe(space, storage_root(storage_path), slots))
    try:
        plan = memory_plan(space)
        lines.append(f"memory per GPU: {plan.summary()}; model shape from {plan.shape.source}"
                     if plan else "memory per GPU: not planned (no resources.gpu_memory_gb)")
    except UserError as e:
        lines.append(f"memory: does not fit: {e}")
        refusals.append(f"memory: {e}")
    try:  # what the run needs installed (bitsandbytes, Liger), as launch.check_inputs refuses it
        from simpo_ray.config import check_packages

        check_packages(space.default_config())
    except UserError as e:
        lines.append(f"packages: {e}")
        refusals.append(str(e))
    for line in _sources(space.default_config(), refusals):
        lines.append(line)
    est = estimate_gpu_hours(space)
    if space.resources.gpus_per_worker > 0:
        lines.append(
            f"estimate: {est['steps_per_trial']} steps and {est['tokens_per_trial']:.3g} tokens per trial; "
            f"{est['gpu_hours_per_trial']:.3g} GPU-hours per trial ({est['wall_hours_per_trial']:.3g} h on "
            f"{est['gpus_per_trial']} GPUs); search: at most {est['gpu_hours_upper_bound']:.3g} GPU-hours, "
            f"about {est['gpu_hours_asha_estimate']:.3g} with {space.search.scheduler}")
        lines.append(f"  assumptions: {est['assumptions']}")
    else:
        lines.append(f"estimate: {est['steps_per_trial']} steps per trial on CPU (no GPU-hours)")
    lines.append(f"results would go to {experiment_path(storage_path, check_name(name) if name else space.name)}")
    return "\n".join(lines), refusals


def _sources(cfg, refusals: list[str]) -> list[str]:
    """The dry run's lines on the run's model, tokenizer and data (`data.sources.check_sources`,
    no download) and on `max_length` against the model's own position limit; what the run would
    refuse is added to `refusals`."""
    from simpo_ray.data.sources import MISSING, check_sources
    from simpo_ray.train.model import position_limit
    from simpo_ray.train.reference_models import config_for

    lines = []
    for line in check_sources(cfg):
        lines.append(f"source: {line}")
        if any(m in line for m in MISSING):
            refusals.append(line)
    try:
        config, source = config_for(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code,
                                    revision=cfg.model_revision)
    except (KeyError, UserError):
        return lines
    found = position_limit(config) if source == f"the config of {cfg.model_name_or_path}" else None
    if found is not None and cfg.max_length > found[0]:
        refusals.append(f"max_length: {cfg.max_length} is above the position limit of model "
                        f"'{cfg.model_name_or_path}' ({found[1]}: {found[0]}); set max_length to at most {found[0]}")
    return lines


def storage_root(storage_path: str | None) -> str:
    """Where searches are stored: `storage_path` (a local dir, made absolute, or a URI), default ./results."""
    return Storage(storage_path or "results").root


def experiment_path(storage_path: str | None, name: str) -> str:
    return Storage(storage_root(storage_path)).path(name)


def memory_plan(space: SearchSpace):
    """The memory plan of one trial of `space` (`memory.plan_for`): None on CPU-only spaces;
    `UserError` (one line, before any Ray process) when no strategy fits `gpu_memory_gb`."""
    return plan_for(space.default_config(), space.resources,
                    space.estimate.params_billion if space.estimate else None)
