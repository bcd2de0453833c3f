"""Experiment tracking for every training stage, beside the stage folder's own ``metrics.json``:

- TensorBoard: event files under ``<run>/<stage>/tensorboard``, written live by the worker that reports
  (``tensorboard --logdir runs/tiny`` shows every stage);
- MLflow (optional: ``pip install atm-ray[mlflow]`` and ``tracking.mlflow_uri``): one MLflow run per stage
  when it finishes, with the stage's settings as parameters, every evaluation as metrics at its step,
  and the export as artifacts.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path

from atm_ray.config import AtmRayError, TrackingConfig

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"


def numeric(metrics: dict) -> dict[str, float]:
    """The metrics a chart can show: finite numbers (not flags, not lists)."""
    return {
        name: float(value) for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


class TensorBoardLog:
    """Scalars of each report at its step; opened on the first report, so a stage whose folder is not
    visible to this worker (another node, no shared storage) writes nothing."""

    def __init__(self, stage_dir: str | Path, enabled: bool = True):
        self.directory = Path(stage_dir) / TENSORBOARD_DIR
        self.enabled = enabled and Path(stage_dir).is_dir()
        self.writer = None

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        if self.writer is None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.directory), flush_secs=10)
        for name, value in numeric(metrics).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        """Writes what is still queued (``flush`` alone may leave the last events in the writer's queue)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def flatten(settings: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow parameters: ``engine.learning_rate`` -> ``"0.002"``."""
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:500]  # MLflow's limit for a parameter's value
    return flat


def check_tracking(tracking: TrackingConfig) -> None:
    """Before any work: a configured MLflow must be importable."""
    if tracking.mlflow_uri and importlib.util.find_spec("mlflow") is None:
        raise AtmRayError("tracking.mlflow_uri is set but MLflow is not installed: pip install 'atm-ray[mlflow]'")


def log_stage_to_mlflow(tracking: TrackingConfig, stage: str, params: dict, history: list[dict], export_dir: Path,
                        step_key: str = "step") -> str | None:
    """One MLflow run for a finished stage; returns its id (None when MLflow is not configured)."""
    if not tracking.mlflow_uri:
        return None
    check_tracking(tracking)
    import mlflow

    uri = tracking.mlflow_uri
    if uri.startswith("file:") or "://" not in uri:
        # a file store is what the user asked for; MLflow 3 wants that said explicitly
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking.mlflow_experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(tracking.mlflow_experiment)
    run = client.create_run(experiment_id, run_name=stage, tags={"atm_ray.stage": stage})
    try:
        flat = flatten(params)
        names = list(flat)
        for start in range(0, len(names), 100):  # MLflow takes at most 100 parameters per batch
            client.log_batch(run.info.run_id, params=[mlflow.entities.Param(name, flat[name]) for name in names[start : start + 100]])
        timestamp = mlflow.utils.time.get_current_time_millis()
        for entry in history:
            step = int(entry.get(step_key, 0))
            metrics = [mlflow.entities.Metric(name, value, timestamp, step) for name, value in numeric(entry).items()]
            for start in range(0, len(metrics), 1000):
                client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
        client.log_artifacts(run.info.run_id, str(export_dir), artifact_path="export")
        client.set_terminated(run.info.run_id)
    except Exception:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    logger.info("[%s] MLflow run %s in experiment %s (%s)", stage, run.info.run_id, tracking.mlflow_experiment, uri)
    return run.info.run_id
