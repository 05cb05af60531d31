"""Write a whole analysis into a directory, atomically: a temp dir renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from analysis import diagnose, plots, report
from analysis.load import Results, load_results, slug
from simpo_ray.errors import UserError


def analyse(paths: list[str | Path], out: str | Path) -> Path:
    """Load the searches under `paths` and write the analysis to `out`.

    Everything is written into a temporary sibling of `out` first; only a complete result is
    renamed into place (an existing `out` is replaced), so a failure leaves `out` as it was.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    results = load_results(paths)  # all input errors surface before anything is written
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise UserError(f"--out {out}: cannot create ({e.strerror})") from None
    try:
        write(results, tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def write(results: Results, out: Path) -> None:
    """recommendations.md, the CSV tables, plots/*.png and configs/<size>.yaml into `out`."""
    tables = report.write_tables(results, out)
    flags = diagnose.trial_flags(results)
    diag = diagnose.diagnose(results, flags)
    diag.to_csv(out / "diagnostics.csv", index=False)
    flags.to_csv(out / "diagnostics_trials.csv", index=False)
    figures = plots.save_all(results, out)
    configs = {}
    (out / "configs").mkdir()
    for size in results.sizes:
        text, note = report.export_config(results, size)
        configs[size] = (text, note)
        if text is not None:
            (out / "configs" / f"{slug(size)}.yaml").write_text(text)
    (out / "recommendations.md").write_text(report.markdown(results, tables, diag, figures, configs))
