"""The masked-LM stages (teacher pretraining, distillation, continued pretraining), planned from the
stage table (``atm_ray.train.stage_table``) and run with the engine loop of ``atm_ray.train.engine``:

- ``run_stage``: Ray Train's ``TorchTrainer`` drives one engine per worker; data comes through Ray Data
  (Parquet shards -> one split per worker -> masking collator in the worker); checkpoints hold every
  rank's ZeRO shards; failed workers restart from the last checkpoint.
- ``run_stage_local``: the same loop in this process, no Ray (GPU checks, benchmarks, ``torchrun``).

The trainer comes from the stage's objective (``TRAINERS``); what every stage does alike (hash, skip,
``TorchTrainer``, publishing) lives in ``atm_ray.train.runner``.
"""

from __future__ import annotations

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
from atm_ray.data.prepare import PreparedData, prepare
from atm_ray.data.tokenizer import load_tokenizer
from atm_ray.train.distill import DistillTrainer
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
from atm_ray.train.runner import MANIFEST_FILE, StageProgress, fit_with_ray, publish_stage, stage_hash, up_to_date, worker_output_to_log
from atm_ray.data.teacher_folder import SAFE_LOADING
from atm_ray.train.teachers import check_teachers, provided_teacher, weights_hash
from atm_ray.data.tokenizer import SpecialTokens
from atm_ray.train.stage_table import DISTILL_STAGES, DOMAINS, PRETRAIN_STAGES, STAGES, Stage, settings_at
from atm_ray.tracking import check_tracking
from atm_ray.utils import atomic_write_json, console_logging, settings_hash

logger = logging.getLogger(__name__)

# which trainer optimises a stage's objective
TRAINERS = {"mlm": MlmTrainer, "distill": DistillTrainer}


@dataclass
class StagePlan:
    """Everything a worker needs to run one stage, in plain values."""

    name: str  # the stage folder, e.g. teacher_stage1
    objective: str  # "mlm" or "distill": picks the trainer
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
    unigram_tokens: dict[str, int] = field(default_factory=dict)  # per domain: the plateau's guess
    special_tokens: dict = field(default_factory=dict)  # the tokenizer's ids (SpecialTokens.to_dict())
    provided: str | None = None  # a teacher the user brought (teachers.*): the stage uses it instead of training


@dataclass
class StageResult:
    stage_dir: Path
    export_dir: Path
    metrics: dict
    skipped: bool = False

    def summary(self) -> str:
        """Two lines for the console (every metric is in the stage's ``metrics.json``)."""
        if self.export_dir.parent != self.stage_dir:
            return f"{self.stage_dir.name}: the teacher you gave, {self.export_dir} (not trained here)"
        state = "up to date" if self.skipped else "finished"
        metrics = self.metrics
        parts = [
            f"{domain}: perplexity {metrics[f'{domain}/perplexity']:.1f}, mask filling {metrics[f'{domain}/mask_fill_accuracy']:.3f}"
            f" (most frequent token {metrics.get(f'{domain}/unigram_mask_fill_accuracy', float('nan')):.3f})"
            for domain in DOMAINS if f"{domain}/perplexity" in metrics
        ]
        if "teacher_switch_step" in metrics:
            parts.append(f"teacher switched at step {metrics['teacher_switch_step']}")
        head = f"{self.stage_dir.name} {state} (step {metrics.get('step', '?')}): export in {self.export_dir}"
        return head + ("\n  " + "; ".join(parts) if parts else "")


def stage_settings(config: Config, plan: StagePlan) -> StageConfig:
    return settings_at(config, plan.settings_key)


def make_plan(config: Config, prepared: PreparedData, run_dir: Path, stage: Stage | str) -> StagePlan:
    """The plan of a row of the stage table (or of a variant of one, as the benchmarks build). Its hash
    covers its settings, the prepared data and every upstream stage's hash; those stages must have
    finished."""
    stage = STAGES[stage] if isinstance(stage, str) else stage
    if stage.objective not in TRAINERS:
        raise AtmRayError(f"stage {stage.name}: objective {stage.objective!r} is not a masked-LM stage")
    provided = provided_teacher(config, stage.name)
    if provided:
        return _provided_plan(config, prepared, run_dir, stage, provided)
    settings = settings_at(config, stage.settings_key)
    replay_fraction = settings_at(config, stage.replay_fraction_key) if stage.replay and stage.replay_fraction_key else 0.0
    # several teachers are taken in turn only when the stage switches between them
    teachers = stage.teachers if getattr(settings, "switch", None) else stage.teachers[-1:]
    stage_dir = run_dir / stage.name
    model = settings_at(config, stage.model_key)
    sections = {
        "prepare": prepared.manifest["config_hash"],
        "model": config.models[model].model_dump(),
        "settings": settings.model_dump(),
        "mask_probability": config.pretrain.mask_probability,
        "seed": config.seed,
        "workers": config.cluster.num_workers,
        "replay_fraction": replay_fraction,
    }
    # the role names keep the hashes of runs made before the table existed
    roles = {"init_from": stage.init_from} if stage.init_from else {}
    roles.update({("teacher" if index == 0 else f"teacher{index + 1}"): name for index, name in enumerate(teachers)})
    for role, upstream_name in roles.items():
        if provided_teacher(config, upstream_name):  # a brought teacher: nothing to run first
            upstream_plan = make_plan(config, prepared, run_dir, upstream_name)
            use_provided(upstream_plan)  # recorded (path, weights hash) in its stage folder
            sections[f"upstream:{role}"] = upstream_plan.config_hash
        else:
            sections[f"upstream:{role}"] = stage_hash(run_dir / upstream_name)

    def export_of(name: str) -> str:
        return export_dir_of(config, run_dir, name)

    plan = StagePlan(
        name=stage.name,
        objective=stage.objective,
        settings_key=stage.settings_key,
        model=model,
        stage_dir=str(stage_dir.resolve()),
        config_hash=settings_hash(sections),
        train_dir=str(prepared.shard_dir(stage.train, "train").resolve()),
        replay_dir=str(prepared.shard_dir(stage.replay, "train").resolve()) if stage.replay and replay_fraction > 0 else None,
        replay_fraction=replay_fraction if stage.replay else 0.0,
        heldout_dirs={domain: str(prepared.shard_dir(domain, "heldout").resolve()) for domain in DOMAINS},
        vocab_size=prepared.vocab_size,
        init_from=export_of(stage.init_from) if stage.init_from else None,
        teachers=[export_of(name) for name in teachers],
        unigram_tokens=prepared.unigram_tokens(),
        special_tokens=prepared.special_tokens.to_dict(),
    )
    check_teacher_vocabularies(plan)
    return plan


def export_dir_of(config: Config, run_dir: Path, name: str) -> str:
    """Where stage ``name``'s model is: its export, or the folder of the teacher the user brought for it."""
    provided = provided_teacher(config, name)
    return str(Path(provided).expanduser().resolve()) if provided else str((run_dir / name / EXPORT_DIR).resolve())


def check_teacher_vocabularies(plan: StagePlan) -> None:
    """A student learns the teacher's distribution token by token: refuse one whose vocabulary differs from
    its teacher's before any work starts (each teacher's config.json is read, no weights)."""
    for teacher in plan.teachers:
        config_file = Path(teacher) / "config.json"
        if config_file.is_file():
            vocab_size = json.loads(config_file.read_text()).get("vocab_size")
            if vocab_size != plan.vocab_size:
                raise AtmRayError(
                    f"stage {plan.name}: the student's vocabulary ({plan.vocab_size}, from {Path(plan.train_dir).parents[2]}"
                    f"/tokenizer) differs from teacher {teacher}'s ({vocab_size}): teacher and student must share one "
                    "tokenizer (prepare the data with the teacher's: teachers.stage1)"
                )


def _provided_plan(config: Config, prepared: PreparedData, run_dir: Path, stage: Stage, provided: str) -> StagePlan:
    """The plan of a teacher stage replaced by a folder: nothing to train; its hash is the folder's weights'."""
    path = str(Path(provided).expanduser().resolve())
    digest = weights_hash(path)
    return StagePlan(
        name=stage.name, objective=stage.objective, settings_key=stage.settings_key, model=settings_at(config, stage.model_key),
        stage_dir=str((run_dir / stage.name).resolve()),
        config_hash=settings_hash({"provided": path, "weights_sha256": digest, "prepare": prepared.manifest["config_hash"]}),
        train_dir="", replay_dir=None, replay_fraction=0.0, heldout_dirs={}, vocab_size=prepared.vocab_size,
        special_tokens=prepared.special_tokens.to_dict(), provided=path,
    )


def use_provided(plan: StagePlan) -> StageResult:
    """Record the brought teacher in the stage's manifest (path and weights hash), which later stages' hashes
    cover, so that another folder or changed weights rerun what learnt from it."""
    stage_dir = Path(plan.stage_dir)
    manifest = up_to_date(plan.stage_dir, plan.config_hash)
    if manifest is None:
        stage_dir.mkdir(parents=True, exist_ok=True)
        digest = weights_hash(plan.provided)
        manifest = {"stage": plan.name, "config_hash": plan.config_hash, "provided": True,
                    "inputs": {"teacher": plan.provided}, "outputs": {"export": plan.provided},
                    "weights_sha256": digest, "metrics": {}}
        atomic_write_json(stage_dir / MANIFEST_FILE, manifest)
        logger.info("%s: the teacher in %s (weights sha256 %s…), not trained here", plan.name, plan.provided, digest[:12])
    return StageResult(stage_dir, Path(plan.provided), {}, skipped=True)


def finished(plan: StagePlan) -> StageResult | None:
    if plan.provided:
        return use_provided(plan)
    manifest = up_to_date(plan.stage_dir, plan.config_hash)
    if manifest is None:
        return None
    stage_dir = Path(plan.stage_dir)
    return StageResult(stage_dir, stage_dir / EXPORT_DIR, manifest.get("metrics", {}), skipped=True)


def build_trainer(config: Config, plan: StagePlan) -> tuple[MlmTrainer, float]:
    """The stage's model inside the trainer of its objective, and the fingerprint of the weights it
    starts from."""
    settings = stage_settings(config, plan)
    special = SpecialTokens.from_dict(plan.special_tokens)
    torch.manual_seed(config.seed)
    if plan.init_from:
        from transformers import AutoModelForMaskedLM

        # trained in fp32 (or autocast); init_from may be a teacher the user brought: safe loading only
        model = AutoModelForMaskedLM.from_pretrained(plan.init_from, dtype=torch.float32, **SAFE_LOADING)
        if model.config.vocab_size != plan.vocab_size:
            raise AtmRayError(
                f"{plan.init_from} has a vocabulary of {model.config.vocab_size}, the prepared data {plan.vocab_size}"
            )
    else:
        model = build_masked_lm(config.models[plan.model], plan.vocab_size, seed=config.seed, special=special)
    mask_probability = config.pretrain.mask_probability
    if plan.objective == "distill":
        trainer = DistillTrainer(model, settings, plan.teachers, plan.vocab_size, mask_probability, config.seed, special)
    else:
        trainer = MlmTrainer(model, settings.engine, settings.steps, plan.vocab_size, mask_probability, config.seed, special)
    return trainer, parameter_checksum(trainer.export_module())


def heldout_rows(plan: StagePlan, stage: StageConfig) -> dict[str, dict[str, np.ndarray]]:
    """The held-out rows every evaluation scores (the same ones each time)."""
    limit = stage.eval_batches * LoopSettings.eval_batch_size
    rows = {}
    for domain, directory in plan.heldout_dirs.items():
        columns = read_rows(directory)
        rows[domain] = {name: column[:limit] for name, column in columns.items()}
    return rows


def loop_settings(config: Config, plan: StagePlan, initial_checksum: float, fail: dict, resumed_from: int = 0,
                  progress: StageProgress | None = None) -> LoopSettings:
    settings = stage_settings(config, plan)
    callbacks = [callback for callback in (ExitAtStep(**fail) if fail else None, progress and progress.step) if callback]

    def on_step(step: int, rank: int) -> None:
        for callback in callbacks:
            callback(step, rank)

    return LoopSettings(
        steps=settings.steps,
        eval_every=settings.eval_every,
        eval_batches=settings.eval_batches,
        checkpoint_every=settings.checkpoint_every,
        unigram_tokens=plan.unigram_tokens,
        # resumed_from_step: the step this run of the stage started at (0: from the beginning)
        extra_metrics={"initial_weights_checksum": initial_checksum, "resumed_from_step": resumed_from},
        on_step=on_step if callbacks else None,
    )


def describe_evaluation(metrics: dict) -> str:
    """The console line of one evaluation of a masked-LM stage."""
    shown = [f"{name} {metrics[name]:.4g}" for name in ("train_loss", "written/perplexity", "spoken/perplexity",
                                                           "spoken/mask_fill_accuracy", "spoken/unigram_mask_fill_accuracy")
             if name in metrics]
    return f"step {metrics['step']}: {', '.join(shown)}"


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
    """Ray Train's per-worker function: build the engine, resume if asked, run the loop (its output in the
    stage's log file; the driver shows progress)."""
    plan = StagePlan(**loop_config["plan"])
    with worker_output_to_log(plan.stage_dir):
        _stage_train_worker(loop_config, plan)


def _stage_train_worker(loop_config: dict, plan: StagePlan) -> None:
    import ray.train

    console_logging()
    config = Config.model_validate(loop_config["config"])
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
            logger.info("[%s] resumed from the checkpoint of step %d", plan.name, trainer.step)
    resumed_from = trainer.step

    primary_size, replay_size = split_batch_size(settings.engine.micro_batch_size, plan.replay_fraction)
    batches = endless(RayShardSource(loop_config["train_shards"][rank], primary_size, config.seed), position)
    replay = None
    if loop_config.get("replay_shards"):
        replay = endless(RayShardSource(loop_config["replay_shards"][rank], replay_size, config.seed + 1), position)

    progress = StageProgress(plan.stage_dir, settings.steps, trainer.step, describe_evaluation,
                             config.tracking.tensorboard) if rank == 0 else None

    def report(metrics: dict, directory: str | None) -> None:
        if progress and "written/mlm_loss" in metrics:  # not a checkpoint without an evaluation
            progress.evaluated(metrics)
        saved = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=saved)
        if directory:
            shutil.rmtree(directory, ignore_errors=True)

    run_training(
        trainer,
        mixed(batches, replay),
        loop_config["heldout"],
        loop_settings(config, plan, initial_checksum, loop_config["fail"], resumed_from, progress),
        report,
        checkpoint_dir=lambda: tempfile.mkdtemp(prefix="atm-ray-checkpoint-"),
    )
    if progress:
        progress.close()
    torch.distributed.barrier()


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
    done = finished(plan)
    if done:
        return done
    check_tracking(config.tracking)
    Path(plan.stage_dir).mkdir(parents=True, exist_ok=True)
    from atm_ray.cluster import init_ray

    init_ray(config.cluster.address)  # the shards below are Ray Datasets
    workers = config.cluster.num_workers
    loop_config = {
        "config": config.model_dump(mode="json"),
        "plan": asdict(plan),
        "train_shards": worker_splits(plan.train_dir, workers),
        "replay_shards": worker_splits(plan.replay_dir, workers) if plan.replay_dir else None,
        "heldout": heldout_rows(plan, stage_settings(config, plan)),
        "fail": fault_from_environment(plan.stage_dir),
    }
    result = fit_with_ray(
        config, stage_train_worker, loop_config, stage_dir=plan.stage_dir, name=plan.name,
        config_hash=plan.config_hash, num_workers=workers, callbacks=callbacks, describe=describe_evaluation,
    )
    with result.checkpoint.as_directory() as directory:
        return _finish_stage(config, plan, prepared, Path(directory), result.checkpoint.path)


def _finish_stage(config: Config, plan: StagePlan, prepared: PreparedData, final_checkpoint: Path, checkpoint_uri: str) -> StageResult:
    """Publish the export of the final checkpoint with the tokenizer, its metrics and the manifest."""
    history = json.loads((final_checkpoint / HISTORY_FILE).read_text())
    metrics = history[-1] if history else {}
    manifest = {
        "stage": plan.name,
        "config_hash": plan.config_hash,
        "inputs": {"train": plan.train_dir, "replay": plan.replay_dir, "init_from": plan.init_from, "teachers": plan.teachers},
        "outputs": {"checkpoint": checkpoint_uri},
        "metrics": metrics,
    }
    params = {"objective": plan.objective, "config_hash": plan.config_hash, "seed": config.seed, "model": plan.model,
              "shape": config.models[plan.model].model_dump(), "settings": stage_settings(config, plan).model_dump(mode="json")}
    with publish_stage(plan.stage_dir, final_checkpoint, history, manifest, tracking=config.tracking, params=params) as staging:
        load_tokenizer(prepared.tokenizer_dir).save_pretrained(str(staging))
    stage_dir = Path(plan.stage_dir)
    return StageResult(stage_dir, stage_dir / EXPORT_DIR, metrics)


# ---------------------------------------------------------------------- without Ray


def run_stage_local(config: Config, plan: StagePlan, prepared: PreparedData) -> StageResult:
    """The same stage in this process, without Ray (one rank, or each rank of a ``torchrun``)."""
    done = finished(plan)
    if done:
        return done
    check_tracking(config.tracking)
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
        logger.info("[%s] resumed from the checkpoint of step %d", plan.name, trainer.step)
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

    progress = StageProgress(plan.stage_dir, settings.steps, trainer.step, describe_evaluation,
                             config.tracking.tensorboard, bar=True) if rank == 0 else None

    def report(metrics: dict, directory: str | None) -> None:
        if progress and "written/mlm_loss" in metrics:  # not a checkpoint without an evaluation
            progress.evaluated(metrics)
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
        loop_settings(config, plan, initial_checksum, fault_from_environment(plan.stage_dir), resumed_from, progress),
        report,
        checkpoint_dir,
    )
    if progress:
        progress.close()
    torch.distributed.barrier()  # rank 0 has moved the last checkpoint into place
    final = sorted(checkpoints.glob("step-*"), key=lambda path: int(path.name.split("-")[1]))[-1]
    if rank != 0:  # one rank publishes the export
        return StageResult(stage_dir, stage_dir / EXPORT_DIR, {})
    return _finish_stage(config, plan, prepared, final, str(final))


# ---------------------------------------------------------------------- commands


def run_stages(config: Config, names: tuple[str, ...], run_dir: Path | None = None, use_ray: bool = True) -> list[StageResult]:
    """Prepare (or reuse) the data, then run the named stages of the table in order, each planned once
    the one before it has finished."""
    run_dir = Path(run_dir or config.resolved_run_dir())
    check_teachers(config)  # teachers the user brought, refused before any work if they cannot be used
    prepared = prepare(config, run_dir)
    runner = run_stage if use_ray else run_stage_local
    return [runner(config, make_plan(config, prepared, run_dir, name), prepared) for name in names]


def run_pretrain_stage(config: Config, stage: int, run_dir: Path | None = None, use_ray: bool = True) -> StageResult:
    """Teacher pretraining Stage 1 (written text) or 2 (spoken, from the Stage-1 weights)."""
    if stage not in PRETRAIN_STAGES:
        raise AtmRayError(f"--stage must be one of {sorted(PRETRAIN_STAGES)}, not {stage!r}")
    return run_stages(config, PRETRAIN_STAGES[stage], run_dir, use_ray)[-1]


def run_distill(config: Config, student: str, run_dir: Path | None = None, use_ray: bool = True) -> list[StageResult]:
    """``intermediate``: distillation then in-domain continuation; ``final``: the final distillation."""
    if student not in DISTILL_STAGES:
        raise AtmRayError(f"--student must be one of {sorted(DISTILL_STAGES)}, not {student!r}")
    return run_stages(config, DISTILL_STAGES[student], run_dir, use_ray)
