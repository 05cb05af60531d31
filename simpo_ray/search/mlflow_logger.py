"""`report_to: [mlflow]`: Ray Tune's MLflow logger at the training step (`simpo_ray.search.loggers`).
Its own module because importing Ray's MLflow integration imports mlflow."""

from __future__ import annotations

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.result import TIMESTEPS_TOTAL, TRAINING_ITERATION


class MLflowAtStep(MLflowLoggerCallback):
    """One MLflow run per trial, tagged with Tune's trial id (trials.csv's `trial_id`)."""

    def setup(self, *args, **kwargs):
        import logging

        # mlflow sets its logger to INFO when imported: no "Creating initial MLflow database tables"
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        super().setup(*args, **kwargs)

    def log_trial_start(self, trial):
        self.tags = {**(self.tags or {}), "trial_id": trial.trial_id}
        super().log_trial_start(trial)

    def log_trial_result(self, iteration, trial, result):
        if result.get("step") is None:
            return super().log_trial_result(iteration, trial, result)
        metrics = {k: v for k, v in result.items() if k not in (TIMESTEPS_TOTAL, TRAINING_ITERATION)}
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=metrics, step=int(result["step"]))
