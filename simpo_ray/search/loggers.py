"""Where a search's learning curves go besides curves.csv: TensorBoard always, MLflow and W&B when
the reference's `report_to` key names them. Ray Tune's logger callbacks; TensorBoard and MLflow
write every metric of every report at its training step (`step`, curves.csv's x axis; Tune's own
loggers use their result count, so step 0 would be 1 and a rung at step 100 some iteration 3);
W&B is Ray's as it is (its x axis: Tune's result count; `step` is among the metrics). A trial
rerun by --resume starts a second MLflow run and a second events file. No tensors.

    tensorboard --logdir <experiment>          (one events file per trial folder)
    mlflow ui --backend-store-uri sqlite:///<experiment>/mlflow.db
"""

from __future__ import annotations

import os

from ray.tune.logger import TBXLoggerCallback
from ray.tune.result import TIMESTEPS_TOTAL, TRAINING_ITERATION

from simpo_ray.errors import ConfigError

# HF TrainingArguments' `report_to` values this tool honours ("all": every one installed; "none").
BACKENDS = ("tensorboard", "mlflow", "wandb")


def backends(report_to) -> tuple[str, ...]:
    """`report_to` (TrainConfig's: a name, a list of names, "all", "none" or None, as HF takes it)
    as the backends to use."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "none" in names:
        return ()
    if "all" in names:
        return tuple(b for b in BACKENDS if b == "tensorboard" or _installed(b))
    return tuple(dict.fromkeys(names))


def check_installed(names: tuple[str, ...]) -> None:
    """One line, before Ray starts, for a backend whose client is not installed."""
    package = {"mlflow": "mlflow-skinny", "wandb": "wandb"}
    for n in names:
        if n != "tensorboard" and not _installed(n):
            raise ConfigError(f"report_to: {n} needs the {package[n]} package (pip install {package[n]}), "
                              "which is not installed")
    if "wandb" in names and not _wandb_can_log():  # else Ray's logger fails inside Tune, after the data
        raise ConfigError("report_to: wandb needs a W&B login (WANDB_API_KEY, or `wandb login`), or "
                          "WANDB_MODE=offline to keep the runs on this machine")


def _wandb_can_log() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return True
    netrc = os.path.expanduser(os.environ.get("NETRC", "~/.netrc"))  # where `wandb login` keeps the key
    try:
        with open(netrc) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# The user's MLFLOW_TRACKING_URI, read before this process's first MLflow run: `mlflow.set_tracking_uri`
# (Ray's logger calls it) sets the variable, so a second search in one process would read the first's.
_USER_MLFLOW_URI = os.environ.get("MLFLOW_TRACKING_URI")


def mlflow_uri(exp_path: str) -> str:
    """The user's MLFLOW_TRACKING_URI when set (a team's server), else a SQLite store in the
    experiment directory (MLflow 3 refuses its old ./mlruns file store)."""
    return _USER_MLFLOW_URI or f"sqlite:///{os.path.abspath(os.path.join(exp_path, 'mlflow.db'))}"


def callbacks(names: tuple[str, ...], exp_path: str, name: str) -> list:
    """Tune callbacks for `names`: TensorBoard always (it replaces Tune's default one)."""
    out = [TensorBoardAtStep()]
    if "mlflow" in names:
        out.append(_mlflow(exp_path, name))
    if "wandb" in names:  # WANDB_MODE=offline (wandb's own variable) keeps runs on this machine
        from ray.air.integrations.wandb import WandbLoggerCallback

        out.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", "simpo-ray"), group=name))
    return out


def quiet_clients() -> None:
    """No INFO lines from Optuna ("A new study created in RDB") and MLflow ("Creating initial MLflow
    database tables") in a search's output: its own line says where the study and the runs are."""
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def at_step(result: dict) -> dict:
    """`result` with Tune's step fields replaced by the training step (its loggers use
    TIMESTEPS_TOTAL or else TRAINING_ITERATION)."""
    step = result.get("step")
    return result if step is None else {**result, TIMESTEPS_TOTAL: None, TRAINING_ITERATION: int(step)}


class TensorBoardAtStep(TBXLoggerCallback):
    def log_trial_result(self, iteration, trial, result):
        super().log_trial_result(iteration, trial, at_step(result))


def _mlflow(exp_path: str, name: str):
    from simpo_ray.search.mlflow_logger import MLflowAtStep  # imports mlflow: only when asked for

    return MLflowAtStep(tracking_uri=mlflow_uri(exp_path), experiment_name=name)
