"""Turn a finished (or interrupted) search into tables: one row per trial, and learning curves.

`trials.csv` (one row per trial) and `curves.csv` (one row per report) live in the experiment
directory beside `search.json`; `analysis/` and pandas users read them. Writes are atomic.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from simpo_ray.io import write_csv_atomic

SEARCHED = ("learning_rate", "beta", "gamma_beta_ratio", "sft_weight")
STATUSES = ("completed", "stopped_early", "diverged", "errored")
# Metrics copied into trials.csv as final_<name>.
FINAL_METRICS = (
    "loss", "sft_loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
    "eval/loss", "eval/sft_loss", "eval/preference_accuracy", "eval/success_rate",
    "eval/rewards/margins", "eval/rewards/accuracies", "eval/rewards/chosen", "eval/rewards/rejected",
    "eval/logps/chosen", "eval/logps/rejected", "tokens_per_s", "samples", "tokens",
    "train_time_s", "startup_s",
)
CURVE_COLUMNS_FIRST = ("trial_id", "step", "samples", "tokens")


def trial_status(metrics: dict[str, Any], error: BaseException | None) -> str:
    """completed | stopped_early (by the scheduler) | diverged | errored."""
    if error is not None:
        return "errored"
    if metrics.get("diverged") == 1 or metrics.get("status") == "diverged":
        return "diverged"
    if metrics.get("status") == "completed":
        return "completed"
    return "stopped_early" if metrics else "errored"


def is_same_point(params: dict[str, Any], point: dict[str, Any]) -> bool:
    return all(k in params and math.isclose(float(params[k]), float(v), rel_tol=1e-9, abs_tol=1e-15)
               for k, v in point.items())


def build_tables(results: list[Any], *, objective: str, mode: str, default_point: dict[str, Any] | None,
                 info: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, curves) from Ray Tune `Result` objects (a ResultGrid is iterable as such)."""
    rows, curves = [], []
    for result in results:
        metrics = dict(result.metrics or {})
        config = dict(result.config or {})
        params = {k: config[k] for k in SEARCHED if k in config}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        history = _one_row_per_step(result.metrics_dataframe)
        status = trial_status(metrics, result.error)
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
            "error": _one_line(result.error) if result.error is not None else "",
        }
        for name in FINAL_METRICS:
            row[f"final_{name}"] = metrics.get(name, math.nan)
        for key, value in config.items():
            if key not in SEARCHED and isinstance(value, (int, float, str, bool)):
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
    curve_frame = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=list(CURVE_COLUMNS_FIRST))
    first = [c for c in CURVE_COLUMNS_FIRST if c in curve_frame.columns]
    curve_frame = curve_frame[first + [c for c in curve_frame.columns if c not in first]]
    return trials, curve_frame


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


def _one_row_per_step(history: pd.DataFrame | None) -> pd.DataFrame | None:
    """A trial's reports, one per step: the last run's where a step was reported twice.

    A trial interrupted by a killed driver is run again by `--resume` (from its last Train
    checkpoint, or from step 0 when it had none), and Tune appends the new reports to the same
    result file, so steps reported before the kill can appear twice.
    """
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


def best_trial(trials: pd.DataFrame, mode: str) -> pd.Series | None:
    """The best trial by its best objective over its run; errored trials never win."""
    ok = trials[trials["status"] != "errored"].dropna(subset=["best_objective"])
    if ok.empty:
        return None
    ordered = ok.sort_values(["best_objective", "steps"], ascending=[mode == "min", False], kind="stable")
    return ordered.iloc[0]


def summary_table(trials: pd.DataFrame, mode: str, top: int = 5) -> str:
    """A Markdown table of the top trials and the documented default, for the terminal."""
    ok = trials[trials["status"] != "errored"].dropna(subset=["best_objective"])
    ordered = ok.sort_values("best_objective", ascending=mode == "min", kind="stable")
    shown = ordered.head(top)
    default = ordered[ordered["is_default"]]
    if len(default) and default.index[0] not in shown.index:
        shown = pd.concat([shown, default.head(1)])
    header = "| rank | trial | status | learning_rate | beta | gamma_beta_ratio | sft_weight | steps | objective |"
    lines = [header, "|" + "---|" * 9]
    for rank, (idx, r) in enumerate(shown.iterrows(), 1):
        label = f"{r['trial_id']}{' (default)' if r['is_default'] else ''}"
        pos = list(ordered.index).index(idx) + 1
        values = " | ".join(f"{r[k]:.3g}" if k in r and pd.notna(r[k]) else "-" for k in SEARCHED)
        lines.append(f"| {pos} | {label} | {r['status']} | {values} | {int(r['steps'])} | "
                     f"{r['best_objective']:.4f} |")
    return "\n".join(lines)


def _one_line(err: BaseException) -> str:
    text = [line for line in str(err).strip().splitlines() if line.strip()]
    message = text[-1] if text else type(err).__name__
    return f"{type(err).__name__}: {message}"[:500]
