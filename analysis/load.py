"""Load the experiment directories that `simpo_ray.tune` writes into pandas.

One search = one experiment directory holding `search.json`, `trials.csv`, `curves.csv` and
`best_config.yaml`. `load_results(paths)` takes experiment directories or folders of them
(a Tune storage path) and returns one `Results`: a table with one row per trial and the
learning curves in long format. Every problem with the input is a `UserError` in one line.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from simpo_ray.errors import UserError

STATUSES = ("completed", "stopped_early", "diverged", "errored")
FINISHED = ("completed", "stopped_early")  # trials with an objective value that counts
PARAMS = ("learning_rate", "beta", "gamma_beta_ratio", "sft_weight")

# Rows of the cross-size table: the bundled CPU ladder first (smallest model first), then the
# guide's size buckets in its own order.
try:
    from simpo_ray.guide import BUCKET_ORDER as _GUIDE_BUCKETS
except ImportError:  # guide.py not there yet
    _GUIDE_BUCKETS = ("1b-3b", "7b-8b", "8b-13b", "13b-30b", "70b+")
BUCKET_ORDER = ("cpu",) + tuple(b for b in _GUIDE_BUCKETS if b != "cpu")
LADDER_ORDER = ("tiny", "small", "base")

RESULTS_ENV = "SIMPO_RAY_RESULTS"


@dataclass
class Experiment:
    """One search's directory as written by `simpo_ray.tune`."""

    path: Path
    search: dict[str, Any]
    trials: pd.DataFrame  # trials.csv as written
    curves: pd.DataFrame  # curves.csv as written (empty when absent)
    best_config: dict[str, Any] | None  # best_config.yaml, when present

    @property
    def name(self) -> str:
        return str(self.search.get("name") or self.path.name)

    @property
    def model(self) -> str:
        """The model searched: from the space's fixed keys, the best config, the trials' config
        columns, else the search name."""
        for source in (self.search, self.search.get("base"), self.best_config):
            if isinstance(source, dict) and source.get("model_name_or_path"):
                return str(source["model_name_or_path"])
        model = _first(self.trials, "config/model_name_or_path")
        return str(model) if model is not None else self.name


@dataclass
class Results:
    """Trials of one or many searches that share an objective.

    `trials`: one row per trial with `experiment`, `size` (row key: size bucket and model),
    `size_bucket`, `model`, `task`, `model_type`, `trial_id`, `status`, `is_default`, the
    searched parameters, `score` (the objective value that ranks trials), the `final_<metric>`
    columns, and `<metric>@<step>` for the objective and eval metrics at each scheduler rung.
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

    def finished(self, size: str | None = None) -> pd.DataFrame:
        t = self.trials if size is None else self.of_size(size)
        return t[t["status"].isin(FINISHED) & t["score"].notna()]

    def ranked(self, size: str) -> pd.DataFrame:
        """Finished trials of one size, best first (ties: the one trained longer)."""
        t = self.finished(size)
        steps = pd.to_numeric(t["steps"], errors="coerce").fillna(0) if "steps" in t else 0
        return (t.assign(_steps=steps)
                .sort_values(["score", "_steps"], ascending=[self.mode == "min", False], kind="stable")
                .drop(columns="_steps"))

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
                names += [p for p in (e.search.get("params") or {}) if p not in names]
        return [p for p in names if p in self.trials.columns]


def size_sort_key(size: str, bucket: str, model: str) -> tuple:
    b = BUCKET_ORDER.index(bucket) if bucket in BUCKET_ORDER else len(BUCKET_ORDER)
    short = short_model_name(model)
    m = LADDER_ORDER.index(short) if short in LADDER_ORDER else len(LADDER_ORDER)
    return (b, str(bucket), m, size)


def short_model_name(model: str) -> str:
    """`bundled:tiny` -> `tiny`; `mistralai/Mistral-7B-v0.1` -> `Mistral-7B-v0.1`."""
    return re.split(r"[:/]", str(model).rstrip("/"))[-1] or str(model)


def slug(text: str) -> str:
    """A file-name-safe form of a size key (`cpu/tiny` -> `cpu-tiny`)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "size"


def default_results_dir() -> Path:
    """`$SIMPO_RAY_RESULTS`, else the storage path `simpo_ray.tune` writes to by default
    (`./results`, taken at the repository root so a notebook in analysis/ finds it too)."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV]).expanduser()
    try:
        from simpo_ray import tune

        for attr in ("DEFAULT_STORAGE_PATH", "DEFAULT_STORAGE", "default_storage_path"):
            value = getattr(tune, attr, None)
            if value is not None:
                return Path(value() if callable(value) else value).expanduser()
    except Exception:  # tune.py absent or failing to import: fall back to the documented place
        pass
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


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype={"trial_id": str})
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable CSV file ({str(e).splitlines()[0]})") from None


def load_experiment(path: Path) -> Experiment:
    """Read one experiment directory, checking that it is what `simpo_ray.tune` writes."""
    search_file, trials_file = path / "search.json", path / "trials.csv"
    if not search_file.is_file():
        raise UserError(f"{path}: search.json missing: not a simpo_ray result directory")
    try:
        search = json.loads(search_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{search_file}: not valid JSON ({e})") from None
    if not isinstance(search, dict) or "objective" not in search:
        raise UserError(f"{search_file}: not a simpo_ray search description (no 'objective' key)")
    if not trials_file.is_file():
        raise UserError(f"{path}: trials.csv missing: the search has not finished or did not start")
    trials = _read_csv(trials_file)
    missing = [c for c in ("trial_id", "status") if c not in trials.columns]
    if trials.columns.size and missing:
        raise UserError(f"{trials_file}: not a simpo_ray results table (no column {', '.join(missing)})")
    if trials.empty:
        raise UserError(f"{trials_file}: no trials recorded")
    curves_file = path / "curves.csv"
    curves = _read_csv(curves_file) if curves_file.is_file() else pd.DataFrame()
    best_config = None
    if (path / "best_config.yaml").is_file():
        try:
            loaded = yaml.safe_load((path / "best_config.yaml").read_text())
            best_config = loaded if isinstance(loaded, dict) else None
        except yaml.YAMLError:
            best_config = None
    return Experiment(path=path, search=search, trials=trials, curves=curves, best_config=best_config)


# ---------------------------------------------------------------- the combined tables

def objective_of(exp: Experiment) -> tuple[str, str]:
    mode = str(exp.search.get("mode") or _first(exp.trials, "mode") or "max").lower()
    return str(exp.search["objective"]), mode


def _first(df: pd.DataFrame, col: str) -> Any:
    if col in df.columns and df[col].notna().any():
        return df[col].dropna().iloc[0]
    return None


def _as_bool(s: pd.Series) -> pd.Series:
    return s.map(lambda v: str(v).strip().lower() in ("true", "1", "1.0", "yes")).astype(bool)


def trial_scores(trials: pd.DataFrame, curves: pd.DataFrame, objective: str, mode: str) -> pd.Series:
    """The objective value that ranks a trial: its last reported value (Tune's scope "last").

    The last value is what training with this config for the trial's budget gives. (The best
    value over the run, `best_objective`, can come from the step-0 evaluation of the untrained
    model or a passing peak.) From `objective_value`, else `final_<objective>`, else the last
    row of the trial's curve. `mode` is kept for callers that rank.
    """
    score = pd.Series(float("nan"), index=trials.index)
    for col in ("objective_value", f"final_{objective}"):
        if col in trials.columns:
            score = score.fillna(pd.to_numeric(trials[col], errors="coerce"))
    if score.isna().any() and objective in curves.columns and "trial_id" in curves.columns:
        last = (curves.assign(v=pd.to_numeric(curves[objective], errors="coerce")).dropna(subset=["v"])
                .sort_values("step").groupby("trial_id")["v"].last())
        score = score.fillna(trials["trial_id"].map(last))
    return score.where(score.map(lambda v: isinstance(v, float) and math.isfinite(v)))


def scheduler_settings(search: dict[str, Any]) -> dict[str, Any]:
    """Scheduler name and ASHA settings, wherever search.json keeps them: a `scheduler`
    mapping, a `search` mapping (the space's search settings) or top-level keys."""
    out: dict[str, Any] = {}
    for source in (search, search.get("search"), search.get("scheduler")):
        if isinstance(source, dict):
            out.update({k: v for k, v in source.items()
                        if k in ("time_attr", "grace_period", "reduction_factor", "max_t")})
            name = source.get("scheduler") if source is not search.get("scheduler") else source.get("type", source.get("name"))
            if isinstance(name, str):
                out["scheduler"] = name.lower()
    return out


def rung_steps(exp: Experiment) -> tuple[list[int], str]:
    """Steps where the scheduler compared trials, and the curve column they are counted in.

    ASHA/HyperBand milestones are grace_period * reduction_factor**k below max_t, plus max_t
    (the end), in `time_attr` units. Without such a scheduler every report is a rung.
    """
    s = scheduler_settings(exp.search)
    curves = exp.curves
    attr = str(s.get("time_attr") or "training_iteration")
    if s.get("scheduler", "asha") in ("asha", "hyperband", "async_hyperband"):
        try:
            grace, factor, max_t = float(s["grace_period"]), float(s["reduction_factor"]), float(s["max_t"])
        except (KeyError, TypeError, ValueError):
            grace = factor = max_t = 0.0
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
    cover). Read from search.json's `guide` (`simpo_ray.guide.summary` as the search saw it);
    what it lacks is asked from `simpo_ray.guide`. Unknown numbers are NaN.
    """
    raw = exp.search.get("guide") if isinstance(exp.search.get("guide"), dict) else {}
    bucket = str(exp.search.get("size_bucket") or _first(exp.trials, "size_bucket") or "")
    task = exp.search.get("task") or None
    model_type = exp.search.get("model_type") or None
    module = _guide_from_module(bucket, task, model_type)
    out = {}
    for p in PARAMS:
        saved = _guide_entry(raw, p)
        out[p] = {k: saved[k] if not math.isnan(saved[k]) else module[p][k] for k in GUIDE_KEYS}
    return out


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _pair(v: Any) -> tuple[float, float]:
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return _num(v[0]), _num(v[1])
    if isinstance(v, dict):
        return _num(v.get("low")), _num(v.get("high"))
    return float("nan"), float("nan")


def _guide_entry(raw: dict, p: str) -> dict[str, float]:
    """From `guide.summary()`'s shape: defaults / recommended_ranges / documented_ranges."""
    e = dict.fromkeys(GUIDE_KEYS, float("nan"))
    defaults = raw.get("defaults")
    if isinstance(defaults, dict):
        e["default"] = _num(defaults.get(p))
    e["low"], e["high"] = _pair((raw.get("recommended_ranges") or {}).get(p))
    e["doc_low"], e["doc_high"] = _pair((raw.get("documented_ranges") or {}).get(p))
    return e


def _guide_from_module(bucket: str, task: str | None, model_type: str | None) -> dict[str, dict[str, float]]:
    """Ask `simpo_ray.guide`; a preset it does not know is dropped rather than losing the row."""
    out = {p: dict.fromkeys(GUIDE_KEYS, float("nan")) for p in PARAMS}
    try:
        from simpo_ray import guide
    except Exception:  # guide.py missing or broken: the comparison columns stay n/a
        return out
    presets = [(task, model_type), (None, model_type), (task, None), (None, None)]
    for p in PARAMS:
        for keys, fn in ((("low", "high"), "recommended_range"), (("doc_low", "doc_high"), "documented_range")):
            for t, m in presets:
                try:
                    lo, hi = getattr(guide, fn)(p, bucket, t, m)
                except Exception:  # unknown bucket or preset name
                    continue
                out[p][keys[0]], out[p][keys[1]] = _num(lo), _num(hi)
                break
    for t, m in presets:
        try:
            defaults = guide.documented_default(bucket, m, t)
        except Exception:
            continue
        for p in PARAMS:
            out[p]["default"] = _num(defaults.get(p))
        break
    return out


def _experiment_table(exp: Experiment, objective: str) -> pd.DataFrame:
    t = exp.trials.copy()
    t["trial_id"] = t["trial_id"].astype(str)
    t["status"] = t["status"].astype(str).str.strip().str.lower()
    t["is_default"] = _as_bool(t["is_default"]) if "is_default" in t.columns else False
    for col in ("size_bucket", "task", "model_type"):
        value = exp.search.get(col)
        value = "none" if value is None else value  # no task / model-type preset
        if col not in t.columns:
            t[col] = value
        t[col] = t[col].fillna(value).astype(str)
    for p in PARAMS:
        if p in t.columns:
            t[p] = pd.to_numeric(t[p], errors="coerce")
    curves = exp.curves
    if not curves.empty and "trial_id" in curves.columns:
        curves = curves.assign(trial_id=curves["trial_id"].astype(str))
    t["score"] = trial_scores(t, curves, objective, objective_of(exp)[1])
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
            e.search = {**e.search, "name": f"{e.name} ({e.path.parent.name}/{e.path.name})"}
    objectives = {e.name: objective_of(e) for e in experiments}
    if len(set(objectives.values())) > 1:
        listed = "; ".join(f"{n}: {o} ({m})" for n, (o, m) in objectives.items())
        raise UserError(f"mixed objectives across searches ({listed}); analyse them separately")
    objective, mode = next(iter(objectives.values()))
    if mode not in ("max", "min"):
        raise UserError(f"{experiments[0].path}/search.json: mode {mode!r} is not 'max' or 'min'")

    tables, curves, rungs = [], [], {}
    for e in experiments:
        t = _experiment_table(e, objective)
        if not (t["status"].isin(FINISHED) & t["score"].notna()).any():
            counts = ", ".join(f"{n} {s}" for s, n in t["status"].value_counts().items())
            raise UserError(f"{e.path}: no finished trial with a value of {objective} ({counts})")
        tables.append(t)
        rungs[e.name] = rung_steps(e)[0]
        if not e.curves.empty and "trial_id" in e.curves.columns:
            curves.append(e.curves.assign(experiment=e.name, trial_id=e.curves["trial_id"].astype(str)))
    trials = pd.concat(tables, ignore_index=True)
    # Row key: the size bucket and the model searched in it, so the CPU ladder's models
    # (all in bucket `cpu`) and two models of one bucket stay apart.
    trials.insert(1, "size", trials["size_bucket"] + "/" + trials["model"].map(short_model_name))
    curve_table = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(
        columns=["experiment", "trial_id", "step"])
    size_of = trials.drop_duplicates("experiment").set_index("experiment")["size"]
    curve_table["size"] = curve_table["experiment"].map(size_of)
    return Results(experiments, trials, curve_table, objective, mode, rungs)
