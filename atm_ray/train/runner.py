"""What every training stage does the same way, masked-LM or fine-tuning: skip when up to date (its
settings hashed by ``atm_ray.utils.settings_hash``), run its worker function under Ray Train's
``TorchTrainer``, publish its export with the metrics and the manifest.

A stage folder holds ``export/`` (``save_pretrained`` + tokenizer), ``metrics.json`` (one entry per
evaluation), ``manifest.json`` (config hash, inputs, outputs, last metrics) and, while it runs, Ray
Train's run (``ray/``) or the in-process checkpoints (``checkpoints/<config hash>/``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from atm_ray.config import Config
from atm_ray.train.engine import EXPORT_DIR
from atm_ray.utils import atomic_write_json, publish_copy, read_json

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.json"


def stage_hash(stage_dir: str | Path) -> str:
    """The hash a finished stage recorded (a ``FileNotFoundError`` saying so when it has not finished)."""
    manifest = Path(stage_dir) / MANIFEST_FILE
    if not manifest.is_file():
        raise FileNotFoundError(f"{stage_dir}: stage {Path(stage_dir).name} has not finished; run it first")
    return read_json(manifest)["config_hash"]


def up_to_date(stage_dir: str | Path, config_hash: str) -> dict | None:
    """The manifest of a stage that finished with these settings, else ``None``."""
    manifest = Path(stage_dir) / MANIFEST_FILE
    if manifest.is_file():
        recorded = read_json(manifest)
        if recorded.get("config_hash") == config_hash:
            logger.info("%s: up to date in %s", Path(stage_dir).name, stage_dir)
            return recorded
    return None


@contextmanager
def publish_stage(
    stage_dir: str | Path, final_checkpoint: Path, history: list[dict], manifest: dict
) -> Iterator[Path]:
    """Publish a finished stage: yields a staging copy of the checkpoint's export for additions
    (tokenizer, model card), then swaps it in and writes ``metrics.json`` and the manifest (last, so a
    manifest always describes a complete stage). ``manifest`` gains ``outputs.export``."""
    stage_dir = Path(stage_dir)
    export_dir = stage_dir / EXPORT_DIR
    with publish_copy(final_checkpoint / EXPORT_DIR, export_dir) as staging:
        yield staging
    atomic_write_json(stage_dir / METRICS_FILE, history)
    manifest.setdefault("outputs", {})["export"] = str(export_dir)
    atomic_write_json(stage_dir / MANIFEST_FILE, manifest)


def fit_with_ray(
    config: Config,
    worker: Callable[[dict], None],
    loop_config: dict,
    *,
    stage_dir: str | Path,
    name: str,
    config_hash: str,
    num_workers: int,
    datasets: dict | None = None,
    callbacks: list | None = None,
):
    """Run ``worker`` on ``num_workers`` Ray Train workers; returns Ray Train's ``Result``. The run is
    named by the config hash, so the same settings resume their last checkpoint and changed ones start
    afresh."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from atm_ray.cluster import init_ray

    cluster = config.cluster
    init_ray(cluster.address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = cluster.gpus_per_worker or 1
    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config,
        datasets=datasets,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=cluster.use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"{config.name}-{name}-{config_hash}",
            storage_path=cluster.storage_path or str(Path(stage_dir) / "ray"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cluster.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cluster.max_failures),
            callbacks=callbacks,
        ),
    )
    logger.info("%s: %d workers, run folder %s", name, num_workers, stage_dir)
    return trainer.fit()
