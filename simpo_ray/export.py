"""`python -m simpo_ray.export RUN_DIR OUT_DIR`:
a plain Hugging Face model directory (weights, config, tokenizer) from a simpo-ray checkpoint,
whatever strategy and worker count wrote it.

RUN_DIR may be the checkpoint itself, a Ray Train run directory holding `checkpoint_*`
directories (`python -m simpo_ray.train`'s `<storage>/<name>`, a search trial's
`<exp>/train_runs/train-<trial_id>`), or a search's experiment directory (trials.csv). A run's
checkpoint is its best by the score it kept checkpoints by (a trial: its search's objective, as
its history.jsonl recorded it beside each checkpoint), else its latest; a search's is its best
trial's best checkpoint (trials.csv `best_checkpoint`). One line says which.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from simpo_ray.errors import UserError

EXPECTED = ("expected a simpo-ray checkpoint (train_config.yaml and .metadata), a Ray Train run directory "
            "holding checkpoint_* directories, or a search's experiment directory (trials.csv)")


@dataclass(frozen=True)
class Choice:
    path: Path
    why: str  # "best by eval/x = 0.8 at step 40", "latest, step 30" ("" for a checkpoint given as such)


def choose_checkpoint(folder: str | Path) -> Choice:
    """The checkpoint that `folder` (module doc) stands for; `UserError` in one line when none."""
    from simpo_ray.train.checkpoints import is_checkpoint

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{folder}: no such directory; {EXPECTED}")
    if is_checkpoint(folder):
        return Choice(folder, "")
    if (folder / "trials.csv").is_file():
        return _from_search(folder)
    return _from_run(folder, _run_score(folder))


def _run_score(run: Path) -> tuple[str, str] | None:
    """(metric, mode) a search trial's run kept its checkpoints by (`search.run`: the search's
    objective); None for a standalone run, which keeps its latest ones."""
    if run.parent.name != "train_runs" or not (run.parent.parent / "search.json").is_file():
        return None
    from simpo_ray.search.records import SearchRecord

    record = SearchRecord.read(run.parent.parent / "search.json")
    return record.objective, record.mode


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _from_run(run: Path, score: tuple[str, str] | None) -> Choice:
    from simpo_ray.infra.history import HISTORY_FILE, read_history
    from simpo_ray.train.checkpoints import is_checkpoint, saved_counters

    # Ray Train names a checkpoint checkpoint_<date and time>: by name is the order it was written.
    found = sorted(p for p in run.glob("checkpoint_*") if is_checkpoint(p))
    if not found:
        raise UserError(f"{run}: holds no checkpoint; {EXPECTED}")
    # The report that saved each checkpoint (by directory name: the run may have moved since).
    reports = {Path(str(r["checkpoint_path"])).name: r for r in read_history(run / HISTORY_FILE)
               if r.get("checkpoint_path")}

    def step(path: Path):
        return (saved_counters(path) or {}).get("step", reports.get(path.name, {}).get("step", "?"))

    if score is not None:
        metric, mode = score
        scored = [(v if mode == "max" else -v, i, p) for i, p in enumerate(found)
                  if (v := _finite(reports.get(p.name, {}).get(metric))) is not None]
        if scored:  # ties go to the later checkpoint, as Ray Train keeps them
            _, _, best = max(scored)
            return Choice(best, f"best by {metric} = {reports[best.name][metric]:.4g} at step {step(best)}")
    return Choice(found[-1], f"latest, step {step(found[-1])}")


def _from_search(exp: Path) -> Choice:
    """The best trial's (`records.best_trial`) best checkpoint; its run's choice when trials.csv
    names none there (moved, or no checkpoint at its best step)."""
    import pandas as pd

    from simpo_ray.search.records import SearchRecord, best_trial
    from simpo_ray.train.checkpoints import is_checkpoint

    try:
        trials = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str})
    except (ValueError, OSError) as e:
        raise UserError(f"{exp / 'trials.csv'}: not readable ({e})") from None
    if (exp / "search.json").is_file():
        record = SearchRecord.read(exp / "search.json")
        objective, mode = record.objective, record.mode
    else:  # trials.csv names them in every row too
        first = trials.iloc[0] if len(trials) else {}
        objective, mode = str(first.get("objective", "")), str(first.get("mode", ""))
        mode = mode if mode in ("max", "min") else "max"
    best = best_trial(trials, mode) if {"trial_id", "status", "best_objective"} <= set(trials) else None
    if best is None:
        raise UserError(f"{exp / 'trials.csv'}: no trial ranks (completed or stopped early, with a score); "
                        "nothing to export")
    run = exp / "train_runs" / f"train-{best['trial_id']}"
    recorded = best.get("best_checkpoint")
    recorded = Path(recorded) if isinstance(recorded, str) and recorded else None
    for path in ([recorded, run / recorded.name] if recorded else []):  # where it was; where it is if moved
        if is_checkpoint(path):
            return Choice(path, f"best trial {best['trial_id']}, best by {objective} = "
                                f"{float(best['best_objective']):.4g} at step {float(best['best_step']):.0f}")
    choice = _from_run(run, (objective, mode) if objective else None)
    return Choice(choice.path, f"best trial {best['trial_id']}, {choice.why}")


def main(argv: list[str] | None = None) -> int:
    from simpo_ray.cli import OneLineArgumentParser, run_command

    p = OneLineArgumentParser(prog="python -m simpo_ray.export", description=__doc__.split(":", 1)[1].strip(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a checkpoint, a Train run directory, or a search's experiment directory")
    p.add_argument("out_dir", help="where to write the model (save_pretrained)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)

    def command() -> int:
        from simpo_ray.train.checkpoints import export_pretrained

        choice = choose_checkpoint(args.run_dir)
        if choice.why:
            print(f"[simpo-ray] {args.run_dir}: {choice.why} ({choice.path.name})", flush=True)
        out = export_pretrained(choice.path, args.out_dir)
        print(f"[simpo-ray] exported {choice.path} -> {out}")
        return 0

    return run_command(command, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
