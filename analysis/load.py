"""Load the experiment directories that `simpo_ray.tune` writes into one pandas `Results`.

One search = one directory holding `search.json` (read as `simpo_ray.search.records.SearchRecord`),
`trials.csv`, `curves.csv` and `best_config.yaml`. `load_results(paths)` takes such directories
or folders of them and returns the trials (one row each) and the learning curves (long format).
Trials rank by `simpo_ray.search.records.ranked`. Every problem with the input is a one-line `UserError`;
what is read is checked first (`simpo_ray.search.validate`), and an experiment whose tables are partial
(an interrupted or unfinished search) says so in `Experiment.partial`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from simpo_ray import guide
from simpo_ray.search import records
from simpo_ray.errors import UserError
from simpo_ray.transfer.model_size import short_name
from simpo_ray.guide import PARAMS
from simpo_ray.search import validate
from simpo_ray.search.records import SearchRecord

# Rows of the cross-size table: the bundled CPU ladder first (smallest model first), then the
# guide's size buckets in its own order.
BUCKET_ORDER = ("cpu",) + tuple(b for b in guide.BUCKET_ORDER if b != "cpu")
LADDER_ORDER = ("tiny", "small", "base")

RESULTS_ENV = "SIMPO_RAY_RESULTS"


@dataclass
class Experiment:
    """One search's directory as written by `simpo_ray.tune`."""

    path: Path
    search: SearchRecord  # search.json
    trials: pd.DataFrame  # trials.csv as written
    curves: pd.DataFrame  # curves.csv as written (empty when absent)
    best_config: dict[str, Any] | None  # best_config.yaml, when present
    partial: str | None = None  # why the tables are partial (validate.partial_reason), or None

    @property
    def name(self) -> str:
        return self.search.name

    @property
    def model(self) -> str:
        return self.search.model_name_or_path


@dataclass
class Results:
    """Trials of one or many searches that share an objective.

    `trials`: one row per trial with `experiment`, `size` (row key: size bucket and model),
    `size_bucket`, `model`, `task`, `model_type`, `trial_id`, `status`, `is_default`, the
    searched parameters, `score` (the best objective over the run, step 0 excluded: what ranks
    trials), `final_score` (the objective's last reported value), the `final_<metric>` columns,
    and `<metric>@<step>` for the objective and eval metrics at each scheduler rung.
    `curves`: curves.csv of every search, long format, with `experiment` and `size` added.
    """

    experiments: list[Experiment]
    trials: pd.DataFrame
    curves: pd.DataFrame
    objective: str
    mode: str  # "max" or "min"
    rungs: dict[str, list[int]] = field(default_factory=dict)  # experiment -> rung steps

    @property
    def sizes(self) -> list[str]:
        """Size keys in the order of the guide's tables (smallest first)."""
        keys = self.trials.drop_duplicates("size")
        return [k[0] for k in sorted(zip(keys["size"], keys["size_bucket"], keys["model"]),
                                     key=lambda k: size_sort_key(*k))]

    def of_size(self, size: str) -> pd.DataFrame:
        return self.trials[self.trials["size"] == size]

    def ranked(self, size: str) -> pd.DataFrame:
        """The trials of one size that rank (completed or stopped early, with a score), best
        first, by `simpo_ray.search.records.ranked`: the search's own order."""
        return records.ranked(self.of_size(size), self.mode)

    def curve(self, experiment: str, trial_id: str) -> pd.DataFrame:
        c = self.curves
        return c[(c["experiment"] == experiment) & (c["trial_id"] == str(trial_id))].sort_values("step")

    def experiment(self, name: str) -> Experiment:
        return next(e for e in self.experiments if e.name == name)

    def searched_params(self, size: str) -> list[str]:
        """The four guide parameters, then any other parameter a search of this size varied."""
        names = list(PARAMS)
        for e in self.experiments:
            if e.name in set(self.of_size(size)["experiment"]):
                names += [p for p in e.search.params if p not in names]
        return [p for p in names if p in self.trials.columns]


def size_sort_key(size: str, bucket: str, model: str) -> tuple:
    b = BUCKET_ORDER.index(bucket) if bucket in BUCKET_ORDER else len(BUCKET_ORDER)
    short = short_name(model)
    m = LADDER_ORDER.index(short) if short in LADDER_ORDER else len(LADDER_ORDER)
    return (b, str(bucket), m, size)


def slug(text: str) -> str:
    """A file-name-safe form of a size key (`cpu/tiny` -> `cpu-tiny`)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "size"


def default_results_dir() -> Path:
    """`$SIMPO_RAY_RESULTS`, else `results/` at the repository root: where `simpo_ray.tune`
    writes when run from there without --storage-path (a notebook in analysis/ finds it too)."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV]).expanduser()
    return Path(__file__).resolve().parent.parent / "results"


# ---------------------------------------------------------------- finding and reading

def is_experiment_dir(path: Path) -> bool:
    return (path / "search.json").is_file() or (path / "trials.csv").is_file()


def find_experiments(paths: list[str | Path]) -> list[Path]:
    """Experiment directories named by `paths`: each is one, or a folder holding some."""
    if not paths:
        raise UserError("no result directory given")
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise UserError(f"{path}: no such directory")
        if not path.is_dir():
            raise UserError(f"{path}: not a directory (give an experiment directory of simpo_ray.tune)")
        if is_experiment_dir(path):
            candidates = [path]
        else:
            children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not any(path.iterdir()):
                raise UserError(f"{path}: empty directory, no search results in it")
            candidates = [p for p in children if is_experiment_dir(p)]
            if not candidates:
                raise UserError(
                    f"{path}: not a simpo_ray result directory (no search.json or trials.csv in it "
                    "or in its subdirectories)"
                )
        for c in candidates:
            if c.resolve() not in {f.resolve() for f in found}:
                found.append(c)
    return found


def load_experiment(path: Path) -> Experiment:
    """Read one experiment directory, checking that it is what `simpo_ray.tune` writes."""
    search_file = path / "search.json"
    if not search_file.is_file():
        raise UserError(f"{path}: search.json missing: not a simpo_ray result directory")
    search = SearchRecord.read(search_file)
    trials = validate.read_trials(path, search)
    curves = validate.read_curves(path, trials)
    best_config = None
    if (path / "best_config.yaml").is_file():
        try:
            loaded = yaml.safe_load((path / "best_config.yaml").read_text())
            best_config = loaded if isinstance(loaded, dict) else None
        except yaml.YAMLError:
            best_config = None
    return Experiment(path=path, search=search, trials=trials, curves=curves, best_config=best_config,
                      partial=validate.partial_reason(search, trials))


# ---------------------------------------------------------------- the combined tables

def _as_bool(s: pd.Series) -> pd.Series:
    return s.map(lambda v: str(v).strip().lower() in ("true", "1", "1.0", "yes")).astype(bool)


def rung_steps(exp: Experiment) -> tuple[list[int], str]:
    """Steps where the scheduler compared trials, and the curve column they are counted in.

    ASHA/HyperBand milestones are grace_period * reduction_factor**k below max_t, plus max_t
    (the end), in `time_attr` units. Without such a scheduler every report is a rung.
    """
    s = exp.search.search  # the space's search settings
    curves = exp.curves
    attr = str(s["time_attr"])
    if s["scheduler"] in ("asha", "hyperband"):
        grace, factor, max_t = float(s["grace_period"]), float(s["reduction_factor"]), float(s["max_t"])
        if factor > 1 and 0 < grace <= max_t and (attr in curves.columns or attr == "training_iteration"):
            steps, t = [], grace
            while t < max_t:
                steps.append(int(round(t)))
                t *= factor
            steps.append(int(round(max_t)))
            return sorted(set(steps)), attr
    if "step" in curves.columns and not curves.empty:
        # Step 0 is the untrained model's baseline evaluation, not a decision point.
        return sorted({int(v) for v in pd.to_numeric(curves["step"], errors="coerce").dropna() if v > 0}), "step"
    return [], "step"


def _rung_columns(exp: Experiment, objective: str) -> tuple[pd.DataFrame, list[int]]:
    """Wide `<metric>@<step>` table (objective and eval metrics at each rung), by trial_id."""
    curves = exp.curves
    if curves.empty or "trial_id" not in curves.columns or "step" not in curves.columns:
        return pd.DataFrame(), []
    curves = curves.sort_values(["trial_id", "step"]).copy()
    if "training_iteration" not in curves.columns:
        curves["training_iteration"] = curves.groupby("trial_id").cumcount() + 1
    rungs, attr = rung_steps(Experiment(exp.path, exp.search, exp.trials, curves, exp.best_config))
    metrics = [objective] + [c for c in curves.columns if c.startswith("eval/") and c != objective]
    metrics = [m for m in metrics if m in curves.columns]
    rows = []
    for tid, c in curves.groupby("trial_id"):
        row: dict[str, Any] = {"trial_id": tid}
        for r in rungs:
            # ASHA decides at the first report at or past the milestone.
            hit = c[c[attr] >= r].head(1)
            step = int(hit["step"].iloc[0]) if len(hit) else None
            for m in metrics:
                row[f"{m}@{r}"] = float(hit[m].iloc[0]) if len(hit) else float("nan")
            row[f"step@{r}"] = step
        rows.append(row)
    return pd.DataFrame(rows), rungs


GUIDE_KEYS = ("default", "low", "high", "doc_low", "doc_high")


def guide_for(exp: Experiment) -> dict[str, dict[str, float]]:
    """The guide's numbers for each of the four parameters in this search's bucket and presets.

    Per parameter: `default` (documented default), `low`/`high` (the guide's recommended,
    "optimal"/"standard" range) and `doc_low`/`doc_high` (the documented envelope a search may
    cover), from search.json's `guide` (`simpo_ray.guide.summary` as the search saw it).
    """
    g = exp.search.guide
    out = {}
    for p in PARAMS:
        (lo, hi), (doc_lo, doc_hi) = g["recommended_ranges"][p], g["documented_ranges"][p]
        out[p] = {"default": float(g["defaults"][p]), "low": float(lo), "high": float(hi),
                  "doc_low": float(doc_lo), "doc_high": float(doc_hi)}
    return out


def _experiment_table(exp: Experiment, objective: str) -> pd.DataFrame:
    t = exp.trials.copy()
    t["trial_id"] = t["trial_id"].astype(str)
    t["status"] = t["status"].astype(str).str.strip().str.lower()
    t["is_default"] = _as_bool(t["is_default"])
    for col in ("size_bucket", "task", "model_type"):
        value = getattr(exp.search, col)
        value = "none" if value is None else value  # no task / model-type preset
        if col not in t.columns:
            t[col] = value
        t[col] = t[col].fillna(value).astype(str)
    for p in PARAMS:
        if p in t.columns:
            t[p] = pd.to_numeric(t[p], errors="coerce")
    for col in ("steps", "objective_value", "best_objective"):
        t[col] = pd.to_numeric(t[col], errors="coerce")
    t["score"] = t["best_objective"]  # what ranks trials (`records.ranked`), as in the search
    t["final_score"] = t["objective_value"]
    curves = exp.curves
    if not curves.empty and "trial_id" in curves.columns:
        curves = curves.assign(trial_id=curves["trial_id"].astype(str))
    t.insert(0, "experiment", exp.name)
    t.insert(1, "model", exp.model)
    rungs, _ = _rung_columns(Experiment(exp.path, exp.search, exp.trials, curves, exp.best_config), objective)
    if len(rungs):
        t = t.merge(rungs, on="trial_id", how="left")
    return t


def load_results(paths: list[str | Path]) -> Results:
    """Load experiment directories (or folders of them) into one `Results`."""
    experiments = [load_experiment(p) for p in find_experiments(paths)]
    names = [e.name for e in experiments]
    for e in experiments:  # two searches of one name (copies) stay apart
        if names.count(e.name) > 1:
            e.search = dataclasses.replace(e.search, name=f"{e.name} ({e.path.parent.name}/{e.path.name})")
    objectives = {e.name: (e.search.objective, e.search.mode) for e in experiments}
    if len(set(objectives.values())) > 1:
        listed = "; ".join(f"{n}: {o} ({m})" for n, (o, m) in objectives.items())
        raise UserError(f"mixed objectives across searches ({listed}); analyse them separately")
    objective, mode = next(iter(objectives.values()))

    tables, curves, rungs = [], [], {}
    for e in experiments:
        t = _experiment_table(e, objective)
        if records.ranked(t, mode).empty:
            counts = ", ".join(f"{n} {s}" for s, n in t["status"].value_counts().items())
            raise UserError(f"{e.path}: no finished trial with a value of {objective} ({counts})")
        tables.append(t)
        rungs[e.name] = rung_steps(e)[0]
        if not e.curves.empty and "trial_id" in e.curves.columns:
            curves.append(e.curves.assign(experiment=e.name, trial_id=e.curves["trial_id"].astype(str)))
    trials = pd.concat(tables, ignore_index=True)
    # Row key: the size bucket and the model searched in it, so the CPU ladder's models
    # (all in bucket `cpu`) and two models of one bucket stay apart.
    trials.insert(1, "size", trials["size_bucket"] + "/" + trials["model"].map(short_name))
    curve_table = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(
        columns=["experiment", "trial_id", "step"])
    size_of = trials.drop_duplicates("experiment").set_index("experiment")["size"]
    curve_table["size"] = curve_table["experiment"].map(size_of)
    return Results(experiments, trials, curve_table, objective, mode, rungs)
