"""Where a search keeps its Optuna study, so that Optuna's own tools can read it.

Every search's study lives in an Optuna RDB storage: by default a SQLite file in the experiment
directory (`optuna.db`), or the database `search.optuna_storage` / `--optuna-storage` names (a
PostgreSQL or MySQL URL shared by a cluster's searches). Ray Tune's `OptunaSearch` writes every
trial there as it goes (parameters, the objective at each report, the final value and state), and
its pickled state holds only the storage's URL, so `--resume` continues the same study.

    optuna.load_study(study_name="cpu-tiny", storage="sqlite:///results/cpu-tiny/optuna.db")
    optuna-dashboard sqlite:///results/cpu-tiny/optuna.db

SQLite, not Optuna's JournalStorage file: both survive a SIGKILL of the driver (SQLite commits
each write atomically; tests/test_reliability.py kills a driver mid-search and resumes it), and a
SQLite URL is what `optuna.load_study`, optuna-dashboard and a shared database take alike.
No tensors, no Ray.
"""

from __future__ import annotations

import os

from simpo_ray.errors import ConfigError, UserError, one_line

FILE = "optuna.db"
# SQLAlchemy URL schemes Optuna's RDBStorage is documented and tested with.
SCHEMES = ("sqlite", "postgresql", "mysql")


def check_url(url: str, fld: str = "search.optuna_storage") -> str:
    """`url` if it is a database URL of a scheme in SCHEMES (driver suffixes allowed:
    postgresql+psycopg2://...); else one line naming the field and what is allowed."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme.split("+", 1)[0] not in SCHEMES:
        raise ConfigError(f"{fld}: {shown(url)!r} is not a database URL; allowed: sqlite:///path/to/file.db, "
                        "postgresql://user@host/db or mysql://user@host/db (Optuna's RDB storage)")
    return url


def url_for(setting: str | None, exp_path: str) -> str | None:
    """The study's storage URL: `setting` when given, else a SQLite file in the experiment
    directory; None where that directory is not a local path (a cloud URI: SQLite needs a file
    system with locks), where the study stays in Tune's searcher state only. The URL is pickled
    with the searcher: a moved or copied experiment resumes into the database it was started with."""
    if setting:
        check_url(setting)
        path = setting[len("sqlite:///"):] if setting.startswith("sqlite:///") else None
        if path and not os.path.isabs(path):  # pickled with the searcher: not the resume's working directory
            return f"sqlite:///{os.path.abspath(path)}"
        return setting
    if "://" in exp_path:
        return None
    return f"sqlite:///{os.path.abspath(os.path.join(exp_path, FILE))}"


def shown(url: str) -> str:
    """`url` with any password masked, as printed and recorded in search.json."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy parses: nothing in it to hide that it could find
        return url


def open_storage(url: str):
    """Optuna's RDB storage at `url`, connected now (a bad URL or an unreachable database is one
    line before Ray starts, not an error inside Tune's first `suggest`)."""
    import optuna

    if url.startswith("sqlite:///"):  # SQLite creates the file, not its folder
        os.makedirs(os.path.dirname(url[len("sqlite:///"):]) or ".", exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:
        raise UserError(f"search.optuna_storage: cannot open {shown(url)}: {one_line(e, first=True)}") from e


def refuse_existing(storage, name: str, url: str) -> None:
    """A new search must not add its trials to an older search's study of the same name (a shared
    database keeps every search's studies): one line instead."""
    if any(s.study_name == name for s in storage.get_all_studies()):
        raise UserError(f"an Optuna study named '{name}' already exists in {shown(url)}; pass --name to "
                        "start a new search, or --resume to continue that one")


def describe(recorded: dict | None) -> str:
    """One line saying where the study is, from search.json's `optuna_study` ({name, storage})."""
    if not recorded or not recorded.get("storage"):
        return ("Optuna study: kept in Tune's searcher state only (the storage path is not a local folder, "
                "or the search is older); pass --optuna-storage URL to keep it in a database")
    name, url = recorded["name"], recorded["storage"]
    return (f"Optuna study '{name}' in {url}: optuna.load_study(study_name='{name}', storage='{url}'), "
            f"or: optuna-dashboard {url}")
