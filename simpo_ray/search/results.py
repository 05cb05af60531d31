"""The search's outputs: trials.csv, curves.csv, best_config.yaml and the printed summary.

`finish` turns Ray Tune's results into `trials.csv` (one row per trial, with its `rank` by
`simpo_ray.search.records.ranked`) and `curves.csv` (one row per report) in the experiment directory
beside `search.json`, writes the best trial's `best_config.yaml` and prints the summary. Writes
are atomic.

Interrupted searches: Tune saves its experiment state (each trial's status) one last time when
a SIGINT stops it, *before* it stops the running trials, which it then marks TERMINATED in
memory like the trials a scheduler stopped. So the saved state is what tells them apart: a
trial not TERMINATED or ERROR there (RUNNING, PENDING, PAUSED) was cut by the interruption
(`saved_trial_states`), and the search did not finish. Such a search's tables are partial
(`search.json` state `interrupted`), its cut trials `interrupted` (never ranked), no
`best_config.yaml` is written, and the summary gives the `--resume` command.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from simpo_ray.errors import UserError, one_line
from simpo_ray.search.objectives import final_column, pareto_front
from simpo_ray.guide import PARAMS
from simpo_ray.infra.history import read_history
from simpo_ray.io import Storage, write_csv_atomic, write_text_atomic
from simpo_ray.search.records import (
    STATUSES,
    SearchRecord,
    best_trial,
    rank_column,
    ranked,
)

# Metrics copied into trials.csv as final_<name>.
FINAL_METRICS = (
    "loss", "sft_loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
    "eval/loss", "eval/sft_loss", "eval/preference_accuracy", "eval/success_rate",
    "eval/rewards/margins", "eval/rewards/accuracies", "eval/rewards/chosen", "eval/rewards/rejected",
    "eval/logps/chosen", "eval/logps/rejected", "tokens_per_s", "samples", "tokens",
    "train_time_s", "startup_s",
    # generation quality (with a reward model); eval/generation_step: when they were measured
    "eval/reward_win_rate", "eval/reward_win_rate_lc", "eval/reward_mean", "eval/baseline_reward_mean",
    "eval/gen_length", "eval/baseline_gen_length", "eval/generation_step",
    # whether those can be read as they are (train.generation_checks)
    "eval/truncated_rate", "eval/length_separates",
)
CURVE_COLUMNS_FIRST = ("trial_id", "step", "samples", "tokens")
# Tune trial statuses of a trial that ended (by itself, a scheduler, a stopper, or an error).
TUNE_ENDED = ("TERMINATED", "ERROR")
# Where each trial's Train run keeps every report it made (all attempts, in order): the
# learning curve's complete source when Tune's own result file was restarted by a --resume.
TRIAL_HISTORY = "train_runs/train-{trial_id}/history.jsonl"


def trial_status(metrics: dict[str, Any], error: BaseException | None, tune_status: str | None = None) -> str:
    """completed | stopped_early (by the scheduler) | diverged | errored | interrupted.

    `tune_status`: the trial's status in Tune's saved experiment state; one other than
    TERMINATED or ERROR means the search was interrupted while the trial ran or waited.
    """
    if error is not None:
        return "errored"
    if metrics.get("diverged") == 1 or metrics.get("status") == "diverged":
        return "diverged"
    if tune_status is not None and tune_status not in TUNE_ENDED:
        return "interrupted"
    if metrics.get("status") == "completed":
        return "completed"
    return "stopped_early" if metrics else "errored"


def saved_trial_states(exp_path: str) -> dict[str, dict[str, str]]:
    """{trial_id: {"status", "dir", "config"}} from Tune's latest saved experiment state (plain JSON; one
    `experiment_state-<session start>.json` per driver session, the latest last by name).
    Empty when there is none."""
    storage = Storage(exp_path)
    names = [n for n in storage.names("experiment_state-") if n.endswith(".json")]
    text = storage.read_text(names[-1]) if names else None
    if not text:
        return {}
    out = {}
    for state, _ in json.loads(text).get("trial_data", []):
        state = json.loads(state) if isinstance(state, str) else state
        out[str(state["trial_id"])] = {"status": str(state.get("status")),
                                       "dir": str(state.get("relative_logdir") or ""),
                                       "config": state.get("config") or {}}
    return out


def read_trial_history(exp_path: str, trial_id: str) -> pd.DataFrame | None:
    """The reports a trial's Train run recorded in its history.jsonl (every attempt, in order), or None."""
    rows = read_history(Storage(exp_path).path(TRIAL_HISTORY.format(trial_id=trial_id)))
    return pd.DataFrame(rows) if rows else None


def is_same_point(params: dict[str, Any], point: dict[str, Any]) -> bool:
    return all(k in params and math.isclose(float(params[k]), float(v), rel_tol=1e-9, abs_tol=1e-15)
               for k, v in point.items())


def build_tables(results: list[Any], *, objective: str, mode: str, default_point: dict[str, Any] | None,
                 info: dict[str, Any], tune_states: dict[str, dict[str, str]] | None = None,
                 exp_path: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, curves) from Ray Tune `Result` objects (a ResultGrid is iterable as such).

    `info`: the search record's fields (`SearchRecord.to_dict()`); `name`, `size_bucket`,
    `task` and `model_type` label every row. `tune_states`: `saved_trial_states` (which trials
    an interruption cut). `exp_path`: where the trials' Train histories are (`TRIAL_HISTORY`).
    """
    tune_states = tune_states or {}
    by_dir = {s["dir"]: tid for tid, s in tune_states.items() if s["dir"]}
    rows, curves = [], []
    for result in results:
        metrics = dict(result.metrics or {})
        config = dict(result.config or {})
        trial_id = str(metrics.get("trial_id") or by_dir.get(Path(result.path).name) or Path(result.path).name)
        if not config:  # a trial cut before its first report: its parameters are in Tune's state
            config = dict(tune_states.get(trial_id, {}).get("config") or {})
        params = {k: config[k] for k in PARAMS if k in config}
        earlier = read_trial_history(exp_path, trial_id) if exp_path else None
        history = _one_row_per_step(result.metrics_dataframe, earlier)
        if history is not None and len(history) and "step" in history:
            # A trial whose run had ended when a resume restarted it reports nothing new: its
            # last report (status completed) is in its Train history only.
            last = history.iloc[-1]
            if _as_float(metrics.get("step"), -1.0) < _as_float(last["step"], -1.0):
                metrics.update({k: v for k, v in last.items() if not (isinstance(v, float) and math.isnan(v))})
        status = trial_status(metrics, result.error, tune_states.get(trial_id, {}).get("status"))
        best, best_step, best_ckpt = math.nan, math.nan, ""
        if history is not None and objective in history and status != "diverged":
            trained = history[history["step"] > 0] if "step" in history else history
            # Step 0 is the untrained starting point: it must never make a trial "best".
            series = pd.to_numeric(trained[objective], errors="coerce").dropna()
            if len(series):
                best = series.max() if mode == "max" else series.min()
                best_step, best_ckpt = _best_checkpoint(trained.loc[series.index], series, best)
        if status == "diverged":
            best = metrics.get(objective, math.nan)
        row = {
            "trial_id": trial_id, "status": status,
            "is_default": bool(default_point) and is_same_point(params, default_point),
            "size_bucket": info.get("size_bucket"), "task": info.get("task"),
            "model_type": info.get("model_type"), "space": info.get("name"),
            "objective": objective, "mode": mode, **params,
            "steps": metrics.get("step", 0), "total_steps": metrics.get("total_steps"),
            "objective_value": metrics.get(objective, math.nan), "best_objective": best,
            "best_step": best_step, "best_checkpoint": best_ckpt,
            "wall_time_s": metrics.get("time_total_s", math.nan),
            "error": one_line(result.error, with_type=True) if result.error is not None else "",
        }
        for name in FINAL_METRICS:
            row[f"final_{name}"] = metrics.get(name, math.nan)
        for key, value in config.items():
            if key not in PARAMS and isinstance(value, (int, float, str, bool)):
                row[f"config/{key}"] = value
        rows.append(row)
        if history is not None and len(history):
            keep = [c for c in history.columns if _is_curve_metric(c)]
            frame = history[keep].copy()
            frame.insert(0, "trial_id", trial_id)
            curves.append(frame)
    trials = pd.DataFrame(rows)
    if len(trials):
        trials = trials.sort_values("trial_id", kind="stable").reset_index(drop=True)
        trials.insert(2, "rank", rank_column(trials, mode))
    curve_frame = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=list(CURVE_COLUMNS_FIRST))
    first = [c for c in CURVE_COLUMNS_FIRST if c in curve_frame.columns]
    curve_frame = curve_frame[first + [c for c in curve_frame.columns if c not in first]]
    return trials, curve_frame


def _as_float(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _best_checkpoint(rows: pd.DataFrame, scores: pd.Series, best: float) -> tuple[float, str]:
    """(step, checkpoint path) of the best report: the latest of equally good reports, which is
    the one Ray Train keeps when it retains checkpoints by the objective. The path is empty when
    that report carried no checkpoint (a run without checkpointing at eval steps)."""
    at_best = rows[scores == best]
    step = float(at_best["step"].iloc[-1]) if "step" in at_best else math.nan
    if "checkpoint_path" in at_best:
        with_ckpt = at_best["checkpoint_path"].dropna()
        with_ckpt = with_ckpt[with_ckpt.astype(str) != ""]
        if len(with_ckpt):
            return float(at_best.loc[with_ckpt.index[-1], "step"]), str(with_ckpt.iloc[-1])
    return step, ""


def _one_row_per_step(history: pd.DataFrame | None, earlier: pd.DataFrame | None = None) -> pd.DataFrame | None:
    """A trial's reports, one per step: the last run's where a step was reported twice.

    A trial interrupted by a killed or Ctrl-C'ed driver is run again by `--resume`, from its
    last Train checkpoint (or from step 0 when it had none). Tune restarts such a trial's result
    file (it restores a result file only for trials with a *Tune* checkpoint, and trials report
    only Train checkpoints), so after a resume from step 400 Tune's reports start at step 500.
    `earlier`: the trial's Train history (`read_trial_history`, every report of every attempt);
    its reports of the steps before Tune's first one are put back in front. A rerun from step 0
    takes nothing from it: a step reported twice keeps the later run's report.
    """
    if earlier is not None and len(earlier) and "step" in earlier:
        if history is None or not len(history) or "step" not in history:
            history = earlier
        else:
            first = pd.to_numeric(history["step"], errors="coerce").min()
            before = earlier[pd.to_numeric(earlier["step"], errors="coerce") < first]
            if len(before):
                history = pd.concat([before, history], ignore_index=True)
    if history is None or not len(history) or "step" not in history:
        return history
    return history.drop_duplicates(subset="step", keep="last").sort_values(
        "step", kind="stable").reset_index(drop=True)


def _is_curve_metric(column: str) -> bool:
    skip = {"config", "date", "hostname", "node_ip", "pid", "timestamp", "time_this_iter_s",
            "done", "training_iteration", "trial_id", "checkpoint_dir_name", "should_checkpoint"}
    return column not in skip and not column.startswith("config/")


def write_tables(experiment_dir: Path, trials: pd.DataFrame, curves: pd.DataFrame) -> None:
    write_csv_atomic(experiment_dir / "trials.csv", trials)
    write_csv_atomic(experiment_dir / "curves.csv", curves)


def summary_table(trials: pd.DataFrame, mode: str, top: int = 5) -> str:
    """A Markdown table of the top trials (`records.ranked`) and the documented default."""
    ordered = ranked(trials, mode)
    shown = ordered.head(top)
    default = ordered[ordered["is_default"]]
    if len(default) and default.index[0] not in shown.index:
        shown = pd.concat([shown, default.head(1)])
    position = {idx: pos for pos, idx in enumerate(ordered.index, 1)}
    header = "| rank | trial | status | " + " | ".join(PARAMS) + " | steps | objective |"
    lines = [header, "|" + "---|" * (len(PARAMS) + 5)]
    for idx, r in shown.iterrows():
        label = f"{r['trial_id']}{' (default)' if r['is_default'] else ''}"
        values = " | ".join(f"{r[k]:.3g}" if k in r and pd.notna(r[k]) else "-" for k in PARAMS)
        lines.append(f"| {position[idx]} | {label} | {r['status']} | {values} | {int(r['steps'])} | "
                     f"{r['best_objective']:.4f} |")
    return "\n".join(lines)


def _mark_pareto_front(trials: pd.DataFrame, search) -> str:
    """A multi-objective search: the `pareto_front` column of trials.csv (final values of every
    objective) and its summary line; "" for one objective."""
    if not search.objectives or trials.empty:
        return ""
    pairs = [(final_column(m, search.objective), mode) for m, mode in zip(search.objectives, search.modes)]
    for column, _ in pairs:
        if column not in trials:
            trials[column] = math.nan
    trials["pareto_front"] = pareto_front(trials, pairs)
    on = trials[trials["pareto_front"]]
    shown = "; ".join(f"{r['trial_id']} (" + ", ".join(f"{m} {r[c]:.4g}" for m, (c, _) in zip(search.objectives, pairs))
                      + ")" for _, r in on.iterrows())
    return (f"Pareto front of {', '.join(search.objectives)} (final values of the trials that ran their budget; "
            f"stopped-early ones are of an earlier step and kept off): {shown or 'no completed trial'}")


def _generation_warning(best: pd.Series, curves: pd.DataFrame) -> list[str]:
    """[one line] when the best trial's generations, at the step its score comes from (the
    report of its best step; else its final values), were mostly cut at max_new_tokens or won by
    length alone (`generation_checks`); [] otherwise."""
    from simpo_ray.train.generation_checks import final_values, warning_line

    metrics = final_values(best)
    if {"trial_id", "step"} <= set(curves.columns):
        at = curves[(curves["trial_id"].astype(str) == str(best["trial_id"]))
                    & (pd.to_numeric(curves["step"], errors="coerce") == best["best_step"])]
        if len(at):
            metrics = at.iloc[-1].to_dict()
    line = warning_line(metrics)
    return [f"best trial {best['trial_id']} at step {best['best_step']:.0f}: {line}"] if line else []


def search_was_interrupted(tune_states: dict[str, dict[str, str]], num_samples: int) -> bool:
    """Whether the search stopped before its end: in Tune's saved state a trial did not end, or
    fewer trials than `num_samples` were created. (No saved state: results that did not come
    from a Tune run, which cannot tell; read as finished.)"""
    if not tune_states:
        return False
    return (any(s["status"] not in TUNE_ENDED for s in tune_states.values())
            or len(tune_states) < num_samples)


def finish(grid, space, exp_path: str, record: SearchRecord, *, verbose: int = 1,
           resume_command: str | None = None) -> Path:
    """Write trials.csv, curves.csv, search.json (its `state`) and, when the search finished,
    the best trial's best_config.yaml; print the summary.

    `exp_path` is a local directory or a pyarrow URI; for a URI the files are written under
    ./results/<name> and copied there. Returns the local directory. `resume_command`: the
    command line that continues this search, printed when it was interrupted.
    """
    default_point = space.points_to_evaluate[0] if space.points_to_evaluate else None
    results = list(grid)
    states = saved_trial_states(exp_path)
    interrupted = search_was_interrupted(states, record.num_samples)
    record = dataclasses.replace(record, state="interrupted" if interrupted else "finished")
    trials, curves = build_tables(results, objective=record.objective, mode=record.mode,
                                  default_point=default_point, info=record.to_dict(), tune_states=states,
                                  exp_path=exp_path)
    storage = Storage(exp_path)
    local = Path("results") / record.name if storage.is_remote else Path(exp_path)
    front_line = _mark_pareto_front(trials, space.search)
    write_tables(local, trials, curves)
    best = best_trial(trials, record.mode)
    counts = ", ".join(f"{(trials['status'] == s).sum()} {s}" for s in STATUSES) if len(trials) else "no trial"
    if interrupted:
        (local / "best_config.yaml").unlink(missing_ok=True)  # only a finished search has one
        lines = [f"\n[simpo-ray] search '{record.name}' INTERRUPTED before its end: {counts}; "
                 f"{max(0, record.num_samples - len(trials))} not started. The tables are partial "
                 "(search.json: state interrupted); best_config.yaml is written when the search finishes."]
    else:
        lines = [f"\n[simpo-ray] search '{record.name}' finished: {counts}"]
    if best is not None and interrupted:
        lines.append("best so far:")
        lines.append(summary_table(trials, record.mode))
    elif best is not None:
        params = {k: float(best[k]) for k in space.params}
        cfg = space.trial_config(params)
        ckpt = best.get("best_checkpoint") or ""
        header = (f"# Best configuration of search '{record.name}' ({record.objective} = "
                  f"{best['best_objective']:.4f}, trial {best['trial_id']}, step {best['best_step']:.0f}).\n"
                  + (f"# Its checkpoint at that step: {ckpt}\n" if ckpt else "")
                  + f"# Run it: python -m simpo_ray.train --config {local / 'best_config.yaml'}\n")
        write_text_atomic(local / "best_config.yaml", header + cfg.to_yaml())
        lines.append(summary_table(trials, record.mode))
        lines += _generation_warning(best, curves)
        default = trials[trials["is_default"]]
        if len(default) and default.iloc[0]["status"] != "errored":
            d = default.iloc[0]
            lines.append(f"documented default: {record.objective} = {d['best_objective']:.4f} "
                         f"({d['status']}); best: {best['best_objective']:.4f} "
                         f"({best['best_objective'] - d['best_objective']:+.4f})")
        lines.append(f"best config: {local / 'best_config.yaml'}")
        if ckpt:
            lines.append(f"best checkpoint: {ckpt} (step {best['best_step']:.0f})")
            lines.append(f"best model: {export_best(ckpt, local / 'best_model')}")
    elif not interrupted:
        lines.append("no trial finished; see the error column of trials.csv")
    if front_line:
        lines.append(front_line)
    lines.append(f"results: {local / 'trials.csv'} (one row per trial), {local / 'curves.csv'} (learning curves)")
    record.write(local)
    if storage.is_remote:
        record.write(exp_path)
        for fname in ("trials.csv", "curves.csv", "best_config.yaml"):
            if (local / fname).exists():
                storage.write_text(fname, (local / fname).read_text())
    if interrupted:
        lines.append("resume it with: " + (resume_command or f"python -m simpo_ray.tune --space "
                                            f"{record.space_file} --name {record.name} --resume"))
    if verbose:
        print("\n".join(lines), flush=True)
    return local


def export_best(checkpoint: str, out: Path) -> str:
    """The best checkpoint as a plain Hugging Face directory (`checkpoints.export_pretrained`, the
    full state dict gathered once, in this process), written beside and renamed into place; a
    failure is reported in the summary, never fails the finished search."""
    import shutil
    import tempfile

    from simpo_ray.train.checkpoints import export_pretrained

    if Storage(checkpoint).is_remote:
        return f"not exported (remote checkpoint); run python -m simpo_ray.export {checkpoint} DIR"
    tmp = Path(tempfile.mkdtemp(prefix=".best_model.", dir=out.parent))
    try:
        export_pretrained(checkpoint, tmp / "model")
        shutil.rmtree(out, ignore_errors=True)
        (tmp / "model").rename(out)
        return str(out)
    except (UserError, OSError, RuntimeError, ValueError) as e:
        return f"not exported ({one_line(e, with_type=True)}); run python -m simpo_ray.export {checkpoint} DIR"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
