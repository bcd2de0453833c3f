"""Running one training stage (teacher pretraining, distillation, continued pretraining).

A ``StagePlan`` says in plain values what a stage trains, on which data, from what; two runners share
the engine loop of ``atm_ray.train.engine``:

- ``run_stage``: Ray Train's ``TorchTrainer`` drives one engine per worker; data comes through Ray Data
  (Parquet shards -> one split per worker -> masking collator in the worker); checkpoints hold every
  rank's ZeRO shards; failed workers restart from the last checkpoint.
- ``run_stage_local``: the same loop in this process, no Ray (GPU checks, benchmarks, ``torchrun``).

Outputs under ``<run_dir>/<stage name>``: ``export/`` (``save_pretrained`` + tokenizer), ``metrics.json``
(one entry per evaluation), ``metrics.jsonl`` (live), ``manifest.json`` (config hash, inputs, outputs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from atm_ray.config import AtmRayError, Config, StageConfig
from atm_ray.train.engine import (
    EXPORT_DIR,
    HISTORY_FILE,
    LoopSettings,
    MlmTrainer,
    RowSource,
    endless,
    init_single_process_group,
    mixed,
    parameter_checksum,
    read_rows,
    run_training,
    split_batch_size,
)
from atm_ray.train.faults import ExitAtStep, fault_from_environment
from atm_ray.train.modeling import build_masked_lm
from atm_ray.data.prepare import PreparedData
from atm_ray.data.tokenizer import load_tokenizer
from atm_ray.utils import atomic_write_json, publish_copy, read_json

logger = logging.getLogger(__name__)



@dataclass
class StagePlan:
    """Everything a worker needs to run one stage, in plain values."""

    name: str  # the stage folder, e.g. teacher_stage1
    kind: str  # "mlm" or "distill"
    settings_key: str  # where the stage's settings live in the config, e.g. pretrain.stage1
    model: str  # the shape in config.models (used when not initialised from a folder)
    stage_dir: str
    config_hash: str
    train_dir: str
    replay_dir: str | None
    replay_fraction: float
    heldout_dirs: dict[str, str]
    vocab_size: int
    init_from: str | None = None
    teachers: list[str] = field(default_factory=list)
    unigram_tokens: dict[str, int] = field(default_factory=dict)  # per held-out kind: the plateau's guess


@dataclass
class StageResult:
    stage_dir: Path
    export_dir: Path
    metrics: dict
    skipped: bool = False

    def summary(self) -> str:
        state = "up to date" if self.skipped else "finished"
        lines = [f"{self.stage_dir.name} {state}: export in {self.export_dir}"]
        for key in sorted(self.metrics):
            if "/" in key or key.endswith("_loss") or key in ("step", "tokens_per_second", "teacher_switch_step"):
                value = self.metrics[key]
                lines.append(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
        return "\n".join(lines)


def settings_at(config: Config, key: str) -> StageConfig:
    """The stage settings at a dotted ``key`` of the config, e.g. ``distill.final``."""
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def stage_settings(config: Config, plan: StagePlan) -> StageConfig:
    return settings_at(config, plan.settings_key)


def make_plan(
    config: Config,
    prepared: PreparedData,
    run_dir: Path,
    *,
    name: str,
    kind: str,
    settings_key: str,
    model: str,
    train: str,
    replay: str | None,
    replay_fraction: float,
    upstream: dict[str, str] | None = None,
) -> StagePlan:
    """A plan whose hash covers its settings, the prepared data and every upstream stage's hash.

    ``upstream`` maps a role (``init_from``, ``teacher``, ``teacher2``...) to an upstream stage name;
    those stages must have finished.
    """
    stage_dir = run_dir / name
    sections = {
        "prepare": prepared.manifest["config_hash"],
        "model": config.models[model].model_dump(),
        "settings": settings_at(config, settings_key).model_dump(),
        "mask_probability": config.pretrain.mask_probability,
        "seed": config.seed,
        "workers": config.cluster.num_workers,
        "replay_fraction": replay_fraction,
    }
    init_from, teachers = None, []
    for role, upstream_name in (upstream or {}).items():
        upstream_dir = run_dir / upstream_name
        if not (upstream_dir / "manifest.json").is_file():
            raise FileNotFoundError(f"{upstream_dir}: stage {upstream_name} has not finished; run it first")
        sections[f"upstream:{role}"] = read_json(upstream_dir / "manifest.json")["config_hash"]
        export = str((upstream_dir / EXPORT_DIR).resolve())
        if role == "init_from":
            init_from = export
        else:
            teachers.append(export)
    return StagePlan(
        name=name,
        kind=kind,
        settings_key=settings_key,
        model=model,
        stage_dir=str(stage_dir.resolve()),
        config_hash=hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()[:16],
        train_dir=str(prepared.shard_dir(train, "train").resolve()),
        replay_dir=str(prepared.shard_dir(replay, "train").resolve()) if replay and replay_fraction > 0 else None,
        replay_fraction=replay_fraction if replay else 0.0,
        heldout_dirs={kind_: str(prepared.shard_dir(kind_, "heldout").resolve()) for kind_ in ("written", "spoken")},
        vocab_size=prepared.vocab_size,
        init_from=init_from,
        teachers=teachers,
        unigram_tokens=prepared.unigram_tokens(),
    )


def finished(plan: StagePlan) -> StageResult | None:
    stage_dir = Path(plan.stage_dir)
    manifest = stage_dir / "manifest.json"
    if manifest.is_file() and read_json(manifest).get("config_hash") == plan.config_hash:
        return StageResult(stage_dir, stage_dir / EXPORT_DIR, read_json(manifest).get("metrics", {}), skipped=True)
    return None


def build_trainer(config: Config, plan: StagePlan) -> tuple[MlmTrainer, float]:
    """The stage's model inside its engine (a distillation trainer for distillation stages), and the
    fingerprint of the weights it starts from."""
    settings = stage_settings(config, plan)
    torch.manual_seed(config.seed)
    if plan.init_from:
        from transformers import AutoModelForMaskedLM

        model = AutoModelForMaskedLM.from_pretrained(plan.init_from, dtype=torch.float32)  # trained in fp32 (or autocast)
        if model.config.vocab_size != plan.vocab_size:
            raise AtmRayError(
                f"{plan.init_from} has a vocabulary of {model.config.vocab_size}, the prepared data {plan.vocab_size}"
            )
    else:
        model = build_masked_lm(config.models[plan.model], plan.vocab_size, seed=config.seed)
    if plan.kind == "distill":
        from atm_ray.train.distill import DistillTrainer

        trainer = DistillTrainer(model, settings, plan.teachers, plan.vocab_size, config.pretrain.mask_probability, config.seed)
    else:
        trainer = MlmTrainer(model, settings.engine, settings.steps, plan.vocab_size, config.pretrain.mask_probability, config.seed)
    return trainer, parameter_checksum(getattr(trainer.engine.module, "student", trainer.engine.module))


def heldout_rows(plan: StagePlan, stage: StageConfig) -> dict[str, dict[str, np.ndarray]]:
    """The held-out rows every evaluation scores (the same ones each time)."""
    limit = stage.eval_batches * LoopSettings.eval_batch_size
    rows = {}
    for kind, directory in plan.heldout_dirs.items():
        columns = read_rows(directory)
        rows[kind] = {name: column[:limit] for name, column in columns.items()}
    return rows


def loop_settings(config: Config, plan: StagePlan, initial_checksum: float, fail: dict, resumed_from: int = 0) -> LoopSettings:
    settings = stage_settings(config, plan)
    return LoopSettings(
        steps=settings.steps,
        eval_every=settings.eval_every,
        eval_batches=settings.eval_batches,
        checkpoint_every=settings.checkpoint_every,
        unigram_tokens=plan.unigram_tokens,
        # resumed_from_step: the step this run of the stage started at (0: from the beginning)
        extra_metrics={"initial_weights_checksum": initial_checksum, "resumed_from_step": resumed_from},
        on_step=ExitAtStep(**fail) if fail else None,
    )


def _append_metrics_log(stage_dir: str, metrics: dict, steps: int) -> None:
    """Live metrics for people watching a run (best effort: the folder may be on another node), and a
    progress line on the driver's console."""
    if "written/mlm_loss" not in metrics:
        return
    if os.path.isdir(stage_dir):
        with open(os.path.join(stage_dir, "metrics.jsonl"), "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
    shown = [f"{name} {metrics[name]:.4g}" for name in ("train_loss", "written/perplexity", "spoken/perplexity",
                                                           "spoken/mask_fill_accuracy", "spoken/unigram_mask_fill_accuracy")
             if name in metrics]
    print(f"[{Path(stage_dir).name}] step {metrics['step']}/{steps}: {', '.join(shown)}", flush=True)


# ---------------------------------------------------------------------- Ray Train


class RayShardSource:
    """One worker's split of a Ray Dataset, reshuffled each epoch with a seeded local shuffle."""

    def __init__(self, shard, batch_size: int, seed: int):
        self.shard, self.batch_size, self.seed = shard, batch_size, seed

    def epoch(self, epoch: int):
        yield from self.shard.iter_batches(
            batch_size=self.batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=4 * self.batch_size,
            local_shuffle_seed=self.seed + epoch,
        )


def stage_train_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function: build the engine, resume if asked, run the loop."""
    import ray.train

    config = Config.model_validate(loop_config["config"])
    plan = StagePlan(**loop_config["plan"])
    settings = stage_settings(config, plan)
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(max(1, int(config.cluster.cpus_per_worker)))
    trainer, initial_checksum = build_trainer(config, plan)

    position = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            position = trainer.load_checkpoint(directory)
        if rank == 0:
            print(f"[{plan.name}] resumed from the checkpoint of step {trainer.step}", flush=True)
    resumed_from = trainer.step

    primary_size, replay_size = split_batch_size(settings.engine.micro_batch_size, plan.replay_fraction)
    batches = endless(RayShardSource(loop_config["train_shards"][rank], primary_size, config.seed), position)
    replay = None
    if loop_config.get("replay_shards"):
        replay = endless(RayShardSource(loop_config["replay_shards"][rank], replay_size, config.seed + 1), position)

    def report(metrics: dict, directory: str | None) -> None:
        if rank == 0:
            _append_metrics_log(plan.stage_dir, metrics, settings.steps)
        saved = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=saved)
        if directory:
            shutil.rmtree(directory, ignore_errors=True)

    run_training(
        trainer,
        mixed(batches, replay),
        loop_config["heldout"],
        loop_settings(config, plan, initial_checksum, loop_config["fail"], resumed_from),
        report,
        checkpoint_dir=lambda: tempfile.mkdtemp(prefix="atm-ray-checkpoint-"),
    )
    torch.distributed.barrier()


def init_ray(address: str | None = None, dashboard: bool = True) -> None:
    """Join ``address`` (or the cluster of a submitted job), else start a local Ray for this program,
    with its dashboard on 127.0.0.1: Ray's state API lives there, and Ray Train V2's placement-group
    cleaner polls it after every run (without it, each stage leaves a cleaner that warns forever that the
    state API is unavailable, and cannot free a dead run's workers; Tune needs it for trials ASHA stops)."""
    import ray

    environment = {
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray Train V2 waits for the controller's poll on every report; poll often.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        "TOKENIZERS_PARALLELISM": "false",
        # models are built from config and loaded from local folders, never fetched from a hub
        "HF_HUB_OFFLINE": "1",
    }
    if not torch.cuda.is_available():
        environment["DS_ACCELERATOR"] = "cpu"
    # What the user or a submitted job's runtime env already sets wins; Ray refuses to merge a
    # variable that both the job and ray.init set.
    runtime_env = {"env_vars": {name: value for name, value in environment.items() if name not in os.environ}}
    for name, value in environment.items():
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", runtime_env=runtime_env,
                 logging_level=logging.WARNING)


# corpora up to this size are read by the driver and put in the object store whole: Ray Data's read
# tasks cost 4-12 s of worker start-up per stage on a small machine, more than reading them takes
DRIVER_READ_BYTES = 64 * 2**20


def worker_splits(directory: str, workers: int) -> list:
    """The Parquet shards in ``directory`` as ``workers`` equal Ray Dataset splits (rows in file order)."""
    import pyarrow.parquet as pq
    import ray.data

    size = sum(path.stat().st_size for path in Path(directory).rglob("*.parquet")) if os.path.isdir(directory) else None
    if size is not None and size <= DRIVER_READ_BYTES:
        return ray.data.from_arrow(pq.read_table(directory)).split(workers, equal=True)
    return ray.data.read_parquet(directory).split(workers, equal=True)


def run_stage(config: Config, plan: StagePlan, prepared: PreparedData, callbacks: list | None = None) -> StageResult:
    """Run (or resume, or skip when finished) one stage under Ray Train (``callbacks``: Ray Train
    callbacks, e.g. Tune's ``TuneReportCallback`` when a sweep trial runs the stage)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    done = finished(plan)
    if done:
        logger.info("%s: up to date in %s", plan.name, plan.stage_dir)
        return done
    stage_dir = Path(plan.stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    settings = stage_settings(config, plan)
    cluster = config.cluster
    init_ray(cluster.address)
    ray.data.DataContext.get_current().enable_progress_bars = False

    workers = cluster.num_workers
    train_shards = worker_splits(plan.train_dir, workers)
    replay_shards = worker_splits(plan.replay_dir, workers) if plan.replay_dir else None
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = cluster.gpus_per_worker or 1
    trainer = TorchTrainer(
        stage_train_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "plan": asdict(plan),
            "train_shards": train_shards,
            "replay_shards": replay_shards,
            "heldout": heldout_rows(plan, settings),
            "fail": fault_from_environment(plan.stage_dir),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=cluster.use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            # the hash in the name: a changed config starts afresh, the same one resumes
            name=f"{config.name}-{plan.name}-{plan.config_hash}",
            storage_path=cluster.storage_path or str(stage_dir / "ray"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cluster.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cluster.max_failures),
            callbacks=callbacks,
        ),
    )
    logger.info("%s: %d workers, %d steps, run folder %s", plan.name, workers, settings.steps, stage_dir)
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        return _finish_stage(plan, prepared, Path(directory), result.checkpoint.path)


def _finish_stage(plan: StagePlan, prepared: PreparedData, final_checkpoint: Path, checkpoint_uri: str) -> StageResult:
    """Copy the export out of the final checkpoint, add the tokenizer, write metrics and the manifest."""
    stage_dir = Path(plan.stage_dir)
    export_dir = stage_dir / EXPORT_DIR
    with publish_copy(final_checkpoint / EXPORT_DIR, export_dir) as staging:
        load_tokenizer(prepared.tokenizer_dir).save_pretrained(str(staging))
    history = json.loads((final_checkpoint / HISTORY_FILE).read_text())
    atomic_write_json(stage_dir / "metrics.json", history)
    metrics = history[-1] if history else {}
    atomic_write_json(
        stage_dir / "manifest.json",
        {
            "stage": plan.name,
            "config_hash": plan.config_hash,
            "inputs": {"train": plan.train_dir, "replay": plan.replay_dir, "init_from": plan.init_from},
            "outputs": {"export": str(export_dir), "checkpoint": checkpoint_uri},
            "metrics": metrics,
        },
    )
    return StageResult(stage_dir, export_dir, metrics)


# ---------------------------------------------------------------------- without Ray


def run_stage_local(config: Config, plan: StagePlan, prepared: PreparedData) -> StageResult:
    """The same stage in this process, without Ray (one rank, or each rank of a ``torchrun``)."""
    done = finished(plan)
    if done:
        return done
    settings = stage_settings(config, plan)
    stage_dir = Path(plan.stage_dir)
    # keyed by the config hash, as Ray Train's runs are: changed settings never resume another's state
    checkpoints = stage_dir / "checkpoints" / plan.config_hash
    checkpoints.mkdir(parents=True, exist_ok=True)
    init_single_process_group()
    trainer, initial_checksum = build_trainer(config, plan)
    position = 0
    latest = sorted(checkpoints.glob("step-*"), key=lambda path: int(path.name.split("-")[1]))
    if latest:
        position = trainer.load_checkpoint(latest[-1])
        print(f"[{plan.name}] resumed from the checkpoint of step {trainer.step}", flush=True)
    resumed_from = trainer.step
    rank, world = trainer.rank, trainer.world_size
    primary_size, replay_size = split_batch_size(settings.engine.micro_batch_size, plan.replay_fraction)
    batches = endless(RowSource(read_rows(plan.train_dir), primary_size, rank, world, config.seed), position)
    replay = None
    if plan.replay_dir:
        replay = endless(RowSource(read_rows(plan.replay_dir), replay_size, rank, world, config.seed + 1), position)

    def checkpoint_dir() -> str:
        # one rank makes the folder that all ranks then write into (under torchrun every rank calls this)
        directory = checkpoints / f".partial-step-{trainer.step}"
        if rank == 0:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
        torch.distributed.barrier()
        return str(directory)

    def report(metrics: dict, directory: str | None) -> None:
        if rank == 0:
            _append_metrics_log(plan.stage_dir, metrics, settings.steps)
        if directory:
            torch.distributed.barrier()  # every rank has written its shards and RNG state
        if directory and rank == 0:
            final = checkpoints / f"step-{trainer.step}"
            shutil.rmtree(final, ignore_errors=True)
            Path(directory).replace(final)
            kept = sorted(checkpoints.glob("step-*"), key=lambda path: int(path.name.split("-")[1]))
            for old in kept[: -config.cluster.num_to_keep]:
                shutil.rmtree(old, ignore_errors=True)

    run_training(
        trainer,
        mixed(batches, replay),
        heldout_rows(plan, settings),
        loop_settings(config, plan, initial_checksum, fault_from_environment(plan.stage_dir), resumed_from),
        report,
        checkpoint_dir,
    )
    torch.distributed.barrier()  # rank 0 has moved the last checkpoint into place
    final = sorted(checkpoints.glob("step-*"), key=lambda path: int(path.name.split("-")[1]))[-1]
    if rank != 0:  # one rank publishes the export
        return StageResult(stage_dir, stage_dir / EXPORT_DIR, {})
    return _finish_stage(plan, prepared, final, str(final))
