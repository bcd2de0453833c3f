"""What every training stage does the same way, masked-LM or fine-tuning: skip when up to date (its
settings hashed by ``atm_ray.utils.settings_hash``), run its worker function under Ray Train's
``TorchTrainer``, publish its export with the metrics and the manifest.

A stage folder holds ``export/`` (``save_pretrained`` + tokenizer), ``metrics.json`` (one entry per
evaluation), ``manifest.json`` (config hash, inputs, outputs, last metrics) and, while it runs, Ray
Train's run (``ray/``) or the in-process checkpoints (``checkpoints/<config hash>/``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from atm_ray.config import Config, TrackingConfig
from atm_ray.tracking import TensorBoardLog, log_stage_to_mlflow
from atm_ray.train.engine import EXPORT_DIR
from atm_ray.utils import VERBOSE_ENV, atomic_write_json, publish_copy, read_json

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
    stage_dir: str | Path,
    final_checkpoint: Path,
    history: list[dict],
    manifest: dict,
    *,
    tracking: TrackingConfig,
    params: dict,
    step_key: str = "step",
    final_metrics: dict | None = None,
) -> Iterator[Path]:
    """Publish a finished stage: yields a staging copy of the checkpoint's export for additions
    (tokenizer, model card), then swaps it in, records the stage in MLflow when configured, and writes
    ``metrics.json`` and the manifest (last, so a manifest always describes a complete stage).
    ``manifest`` gains ``outputs.export`` (and ``outputs.mlflow_run``); ``final_metrics`` (filled in by the
    block, e.g. test scores) are tracked at the last step."""
    stage_dir = Path(stage_dir)
    export_dir = stage_dir / EXPORT_DIR
    with publish_copy(final_checkpoint / EXPORT_DIR, export_dir) as staging:
        yield staging
    outputs = manifest.setdefault("outputs", {})
    outputs["export"] = str(export_dir)
    tracked = history + ([{step_key: history[-1].get(step_key, 0) if history else 0, **final_metrics}] if final_metrics else [])
    try:
        outputs["mlflow_run"] = log_stage_to_mlflow(tracking, stage_dir.name, params, tracked, export_dir, step_key)
    except Exception as error:  # the stage is trained and published; a tracking server's trouble must not undo it
        logger.warning("[%s] not recorded in MLflow (%s): %s", stage_dir.name, tracking.mlflow_uri, error)
    atomic_write_json(stage_dir / METRICS_FILE, history)
    atomic_write_json(stage_dir / MANIFEST_FILE, manifest)


PROGRESS_FILE = "progress.json"
LOGS_DIR = "logs"


def stage_log_file(stage_dir: str | Path) -> Path:
    """Where a stage's workers write their own output (Ray's, DeepSpeed's, ours): ``<run>/logs/<stage>.log``."""
    stage_dir = Path(stage_dir)
    return stage_dir.parent / LOGS_DIR / f"{stage_dir.name}.log"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


@contextmanager
def worker_output_to_log(stage_dir: str | Path) -> Iterator[None]:
    """In a Ray Train worker: its stdout and stderr (Python's and C's, DeepSpeed's and Ray's lines) go to
    the stage's log file instead of the driver's console, unless the user asked for ``-v``."""
    log_file = stage_log_file(stage_dir)
    if verbose() or not log_file.parent.parent.is_dir():  # -v, or the run folder is on another node
        yield
        return
    log_file.parent.mkdir(exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_file, "a") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class StageProgress:
    """What rank 0 tells people watching a stage, after each evaluation: ``metrics.jsonl``, TensorBoard
    events and ``progress.json`` (the driver's progress bar; also rewritten at most every ``interval_s``
    between evaluations) in the stage folder (best effort: the folder may be on another node), and a log
    line (``describe(metrics)``). ``unit`` is the metrics' position key: ``step`` or ``epoch``."""

    def __init__(self, stage_dir: str | Path, total: int, start: int, describe: Callable[[dict], str],
                 tensorboard: bool = True, unit: str = "step", interval_s: float = 1.0, bar: bool = False):
        self.stage_dir, self.unit, self.describe = Path(stage_dir), unit, describe
        self.enabled = self.stage_dir.is_dir()
        self.tensorboard = TensorBoardLog(stage_dir, tensorboard)
        self.state = {"position": start, "total": total, "unit": unit, "last": {}, "resumed_from": start, "started": time.time()}
        self.interval_s, self.written = interval_s, 0.0
        # in-process runs (--no-ray) draw the bar here; under Ray the driver draws it from progress.json
        self.bar = StageBar(self.stage_dir.name, total, start, unit) if bar else None
        self._write()

    def step(self, position: int, *_ignored) -> None:
        """``LoopSettings.on_step``: the bar moves between evaluations."""
        self.state["position"] = position
        if self.bar:
            self.bar.move(position)
        if time.monotonic() - self.written >= self.interval_s:
            self._write()

    def evaluated(self, metrics: dict) -> None:
        position = metrics[self.unit]
        if self.enabled:
            with open(self.stage_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(metrics) + "\n")
        self.tensorboard.log(metrics, position)
        self.state.update(position=position, last=metrics)
        self._write()
        line = self.describe(metrics)
        logger.info("[%s] %s", self.stage_dir.name, line)
        if self.bar:
            self.bar.move(position, line)

    def close(self) -> None:
        self.tensorboard.close()  # drains the event writer's queue
        if self.bar:
            self.bar.close()

    def _write(self) -> None:
        if self.enabled:
            self.written = time.monotonic()
            atomic_write_json(self.stage_dir / PROGRESS_FILE, self.state)


@contextmanager
def watch_progress(stage_dir: str | Path, describe: Callable[[dict], str]) -> Iterator[None]:
    """The driver's side: while a Ray stage runs, a progress bar from rank 0's ``progress.json`` (on a
    terminal) and a console line per evaluation (``describe(metrics)``); where the workers' logs are."""
    stage_dir = Path(stage_dir)
    path, name = stage_dir / PROGRESS_FILE, stage_dir.name
    path.unlink(missing_ok=True)  # a previous run's
    if not verbose():
        logger.info("[%s] started; its workers' logs: %s", name, stage_log_file(stage_dir))
    stop = threading.Event()
    shown: dict = {"last": None, "resumed": False}
    bar = StageBar(name)

    def poll() -> None:
        try:
            state = read_json(path)
        except (OSError, ValueError):  # not written yet, or mid-replace on a slow filesystem
            return
        if state["resumed_from"] and not shown["resumed"]:
            shown["resumed"] = True
            logger.info("[%s] resumed from the checkpoint of %s %d", name, state["unit"], state["resumed_from"])
        line = None
        if state["last"] and state["last"] != shown["last"]:
            shown["last"] = state["last"]
            line = describe(state["last"])
            logger.info("[%s] %s", name, line)
        bar.move(state["position"], line, total=state["total"], unit=state["unit"])

    def loop() -> None:
        while not stop.wait(0.5):
            poll()

    thread = threading.Thread(target=loop, name=f"progress-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll()
        bar.close()


class StageBar:
    """A stage's tqdm bar on a terminal (none otherwise); while bars show, our log lines go above them.

    Two stages may show bars at once (the pipeline's fine-tunings): the first bar redirects the log lines
    and the last one to close puts them back, whatever the order they close in."""

    _lock = threading.Lock()
    _open = 0
    _redirect = None

    def __init__(self, name: str, total: int | None = None, start: int = 0, unit: str = "step"):
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = tqdm(desc=name, total=total, initial=start, unit=unit, disable=None, dynamic_ncols=True, leave=False)
        if self.bar.disable:
            return
        with StageBar._lock:
            if StageBar._open == 0:
                StageBar._redirect = logging_redirect_tqdm(loggers=[logging.getLogger("atm_ray")])
                StageBar._redirect.__enter__()
            StageBar._open += 1

    def move(self, position: int, line: str | None = None, total: int | None = None, unit: str | None = None) -> None:
        if self.bar.disable:
            return
        if total is not None:
            self.bar.total, self.bar.unit = total, unit or self.bar.unit
        if line:
            self.bar.set_postfix_str(line.split(": ", 1)[-1][:60], refresh=False)
            self.bar.n = position
            self.bar.refresh()
        else:
            self.bar.update(position - self.bar.n)  # redraws at most every tqdm's mininterval

    def close(self) -> None:
        if self.bar.disable:  # never shown, or closed already (tqdm disables a closed bar)
            return
        self.bar.close()
        with StageBar._lock:
            StageBar._open -= 1
            if StageBar._open == 0:
                StageBar._redirect.__exit__(None, None, None)


def fit_with_ray(
    config: Config,
    worker: Callable[[dict], None],
    loop_config: dict,
    *,
    stage_dir: str | Path,
    name: str,
    config_hash: str,
    num_workers: int,
    describe: Callable[[dict], str],
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
    logger.debug("%s: %d workers, run folder %s", name, num_workers, stage_dir)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    with watch_progress(stage_dir, describe):
        try:
            return trainer.fit()
        except SystemExit as exit_:
            # Ray Train's Ctrl-C handler aborts the run, then ends it with sys.exit: make it the
            # KeyboardInterrupt it was (the CLI prints how to resume)
            raise KeyboardInterrupt from exit_
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)  # Ray Train leaves its handler behind
