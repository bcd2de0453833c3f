"""Fine-tuning for joint intent classification + slot filling, under Ray Train (or in this process).

Labelled records are read with the readers of ``atm_ray.data.readers``; label maps come from the training
split; records are encoded on the driver and handed to the workers through Ray Data. Each worker runs the
plain PyTorch loop ``fit`` (DistributedDataParallel through ``ray.train.torch.prepare_model``), evaluates
exact match on dev after every epoch, stops early after ``patience`` epochs without a gain and keeps the
best weights. The stage folder gets ``export/`` (``save_pretrained`` + tokenizer + model card), dev and
test scores, and a manifest.

The scratch baseline is the same architecture from random weights: ``scratch=True``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from atm_ray.config import AtmRayError, Config, FinetuneConfig, NluSource
from atm_ray.data import files
from atm_ray.data.readers import NLU_READERS, read_nlu
from atm_ray.train.engine import EXPORT_DIR, parameter_groups
from atm_ray.train.runner import StageProgress, fit_with_ray, publish_stage, up_to_date, worker_output_to_log
from atm_ray.train.stage_table import FINAL_DISTILL, FINETUNE_SCRATCH, FINETUNE_STUDENT
from atm_ray.nlu.model import (
    RobertaPreLayerNormForIntentAndSlots,
    all_lowercase,
    build_joint_model,
    encode_records,
    label_maps,
    predict_words,
)
from atm_ray.nlu.metrics import nlu_scores
from atm_ray.tracking import check_tracking
from atm_ray.utils import atomic_write_json, atomic_write_text, console_logging, read_json, settings_hash

logger = logging.getLogger(__name__)

STATE_FILE = "finetune_state.pt"


# ---------------------------------------------------------------------- data


def parse_data_argument(text: str) -> NluSource:
    """``FORMAT:PATH`` from the command line; a JointBERT folder with ``train/``, ``dev/`` and ``test/``
    inside stands for its training split (see ``split_sources``)."""
    source_format, colon, path = text.partition(":")
    if not colon or not path:
        raise AtmRayError(f"--data {text!r} is not FORMAT:PATH (e.g. jointbert:data/snips/train)")
    if source_format not in NLU_READERS:
        raise AtmRayError(f"--data {text!r}: unknown format {source_format!r}; one of {sorted(NLU_READERS)}")
    if not path.startswith(files.BUNDLED_PREFIX) and "://" not in path:
        path = str(Path(path).resolve())  # relative to where the command runs, not to data.root
    return NluSource(format=source_format, path=path)


def with_data_arguments(settings: FinetuneConfig, data: list[str], dev: list[str], test: list[str], root: str) -> FinetuneConfig:
    """``settings`` with the splits given on the command line (``FORMAT:PATH`` each) in place of the preset's."""
    update: dict[str, list[NluSource]] = {}
    if data:
        splits = split_sources([parse_data_argument(text) for text in data], root)
        update = {"train": splits["train"], "dev": splits["dev"], "test": splits["test"]}
    if dev:
        update["dev"] = [parse_data_argument(text) for text in dev]
    if test:
        update["test"] = [parse_data_argument(text) for text in test]
    return settings.model_copy(update=update)


def split_sources(sources: list[NluSource], root: str) -> dict[str, list[NluSource]]:
    """Expand JointBERT dataset folders (``train/ dev/ test/`` inside) into their three splits; any other
    source is training data."""
    splits: dict[str, list[NluSource]] = {"train": [], "dev": [], "test": []}
    for source in sources:
        location = files.resolve(source.path, root)
        if source.format == "jointbert" and files.exists(files.join(location, "train/seq.in")):
            for split in splits:
                if files.exists(files.join(location, f"{split}/seq.in")):
                    splits[split].append(source.model_copy(update={"path": files.join(source.path, split)}))
        else:
            splits["train"].append(source)
    return splits


def read_sources(sources: list[NluSource], root: str, strict: bool) -> tuple[list[dict], list[str]]:
    records, reports = [], []
    for source in sources:
        read, report = read_nlu(source.format, files.resolve(source.path, root), source.lang, strict, source.max_records)
        records.extend(read)
        reports.append(report.summary())
    return records, reports


@dataclass
class NluData:
    train: list[dict]
    dev: list[dict]
    test: list[dict]
    reports: list[str] = field(default_factory=list)


def load_nlu_data(settings: FinetuneConfig, root: str, strict: bool, seed: int) -> NluData:
    """Train, dev and test records; a missing dev or test split is cut from the shuffled training records."""
    train, reports = read_sources(settings.train, root, strict)
    if not train:
        raise AtmRayError("finetune.train: no labelled records read")
    random.Random(seed).shuffle(train)
    held_out = {}
    for split, fraction in (("test", settings.test_fraction), ("dev", settings.dev_fraction)):
        sources = getattr(settings, split)
        if sources:
            held_out[split], split_reports = read_sources(sources, root, strict)
            reports += split_reports
        else:
            cut = max(1, int(len(train) * fraction))
            held_out[split], train = train[:cut], train[cut:]
            reports.append(f"{split}: {cut} records held out of finetune.train")
    return NluData(train, held_out["dev"], held_out["test"], reports)


# ---------------------------------------------------------------------- the loop (no Ray)


class NluTrainer:
    """The joint model, its optimiser and schedule, and the early-stopping state."""

    def __init__(self, model: RobertaPreLayerNormForIntentAndSlots, settings: FinetuneConfig, steps_per_epoch: int):
        self.model = model
        self.settings = settings
        if settings.freeze_encoder:
            for parameter in model.encoder_parameters():
                parameter.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(model, settings.weight_decay), lr=settings.learning_rate, betas=(0.9, 0.98), eps=1e-6
        )
        from transformers import get_linear_schedule_with_warmup

        self.max_epochs, self.patience = settings.schedule(steps_per_epoch)
        total = max(1, steps_per_epoch * self.max_epochs)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(settings.warmup_fraction * total), total)
        self.epoch = 0
        self.best_exact_match = -1.0
        self.best_epoch = 0
        self.epochs_without_gain = 0
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []

    @property
    def finished(self) -> bool:
        return self.epoch >= self.max_epochs or self.epochs_without_gain >= self.patience

    def train_epoch(self, forward: torch.nn.Module, batches, device: torch.device) -> dict[str, float]:
        forward.train()
        sums = torch.zeros(3, dtype=torch.float64)
        count = 0
        for batch in batches:
            batch = {name: torch.as_tensor(value) for name, value in batch.items()}
            # rows are padded to max_seq_len, and attention never looks past a row's end: the batch only
            # needs its longest row (SNIPS, rows of 48: 30 positions a batch on average, 16 a row)
            length = int(batch["attention_mask"].sum(dim=1).max())
            batch = {name: (value[:, :length] if value.dim() == 2 else value).to(device) for name, value in batch.items()}
            output = forward(**batch)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            sums += torch.tensor([output.loss.item(), output.intent_loss.item(), output.slot_loss.item()], dtype=torch.float64)
            count += 1
        self.epoch += 1
        mean = (sums / max(count, 1)).tolist()
        return {"train_loss": mean[0], "train_intent_loss": mean[1], "train_slot_loss": mean[2], "train_batches": count}

    def evaluate(self, records: list[dict], tokenizer) -> dict:
        predictions = predict_words(self.model, tokenizer, [record["tokens"] for record in records])
        self.model.train()
        return nlu_scores(records, predictions)

    def after_evaluation(self, metrics: dict) -> None:
        """Early stopping on dev exact match; the best weights are kept."""
        if metrics["dev/exact_match"] > self.best_exact_match:
            self.best_exact_match, self.best_epoch, self.epochs_without_gain = metrics["dev/exact_match"], self.epoch, 0
            self.best_weights = {name: value.detach().cpu().clone() for name, value in self.model.state_dict().items()}
        else:
            self.epochs_without_gain += 1
        metrics.update(best_epoch=self.best_epoch, best_dev_exact_match=self.best_exact_match)
        self.history.append(metrics)

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "best_exact_match": self.best_exact_match,
            "best_epoch": self.best_epoch,
            "epochs_without_gain": self.epochs_without_gain,
            "best_weights": self.best_weights,
            "history": self.history,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name in ("epoch", "best_exact_match", "best_epoch", "epochs_without_gain", "best_weights", "history"):
            setattr(self, name, state[name])
        torch.set_rng_state(state["torch_rng"])

    def export(self, directory: str | Path, tokenizer) -> None:
        """``save_pretrained`` of the best weights (the last ones if none was better) with the tokenizer."""
        best = copy.deepcopy(self.model).cpu()
        if self.best_weights is not None:
            best.load_state_dict(self.best_weights)
        for parameter in best.parameters():
            parameter.requires_grad_(True)  # frozen or not, the export is a normal model
        best.save_pretrained(str(directory), safe_serialization=True)
        tokenizer.save_pretrained(str(directory))


def fit(
    trainer: NluTrainer,
    forward: torch.nn.Module,
    epoch_batches: Callable[[int], Iterator[dict]],
    dev: list[dict],
    tokenizer,
    device: torch.device,
    report: Callable[[dict, NluTrainer], None],
) -> None:
    """Epochs until ``max_epochs`` or early stopping; ``report(metrics, trainer)`` after each one."""
    while not trainer.finished:
        metrics = {"epoch": trainer.epoch + 1, **trainer.train_epoch(forward, epoch_batches(trainer.epoch), device)}
        metrics["learning_rate"] = trainer.scheduler.get_last_lr()[0]
        scores = trainer.evaluate(dev, tokenizer)
        metrics.update({f"dev/{name}": value for name, value in scores.items() if name != "by_lang"})
        trainer.after_evaluation(metrics)
        report(metrics, trainer)


# ---------------------------------------------------------------------- the stage


@dataclass
class FinetunePlan:
    name: str
    stage_dir: str
    encoder_dir: str  # the parent model (a masked-LM export); its architecture only when scratch
    scratch: bool
    config_hash: str
    intent_labels: list[str]
    slot_labels: list[str]
    lowercase: bool
    parent: str  # what the model card names as the parent


def plan_finetune(config: Config, data: NluData, encoder_dir: Path, name: str, scratch: bool, run_dir: Path) -> FinetunePlan:
    settings = config.finetune
    if not (encoder_dir / "config.json").is_file():
        raise FileNotFoundError(f"{encoder_dir}: no config.json; run the stage that exports it first (or pass --model)")
    if not (encoder_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{encoder_dir}: no tokenizer.json beside the model")
    intent_labels, slot_labels = label_maps(data.train)
    if scratch:
        # only the architecture and the tokenizer come from the parent: retraining it does not change the baseline
        parent_hash = hashlib.sha256(
            (encoder_dir / "config.json").read_bytes() + (encoder_dir / "tokenizer.json").read_bytes()
        ).hexdigest()[:16]
    else:
        parent_manifest = encoder_dir.parent / "manifest.json"
        parent_hash = read_json(parent_manifest)["config_hash"] if parent_manifest.is_file() else str(encoder_dir.resolve())
    sections = {
        "settings": settings.model_dump(mode="json"),
        "root": config.data.root,
        "seed": config.seed,
        "parent": parent_hash,
        "scratch": scratch,
        "workers": settings.num_workers,
        "train_records": len(data.train),
        # the records themselves, not only their count: a corrected label file of the same size (or another
        # fold of the same set) must not find the old fine-tuning up to date
        "data": settings_hash({"train": data.train, "dev": data.dev}),
    }
    return FinetunePlan(
        name=name,
        stage_dir=str((run_dir / name).resolve()),
        encoder_dir=str(encoder_dir.resolve()),
        scratch=scratch,
        config_hash=settings_hash(sections),
        intent_labels=intent_labels,
        slot_labels=slot_labels,
        lowercase=all_lowercase(data.train),
        parent=f"random initialisation, architecture of {encoder_dir}" if scratch else str(encoder_dir.resolve()),
    )


def build_nlu_trainer(config: Config, plan: FinetunePlan, steps_per_epoch: int) -> NluTrainer:
    settings = config.finetune
    model = build_joint_model(
        plan.encoder_dir,
        plan.intent_labels,
        plan.slot_labels,
        slot_loss_weight=settings.slot_loss_weight,
        head_dropout=settings.head_dropout,
        intent_pooling=settings.intent_pooling,
        lowercase=plan.lowercase,
        scratch=plan.scratch,
        seed=config.seed,
    )
    return NluTrainer(model, settings, steps_per_epoch)


def _save_state(directory: str, trainer: NluTrainer, tokenizer) -> None:
    torch.save(trainer.state(), Path(directory) / STATE_FILE)
    if trainer.finished:
        trainer.export(Path(directory) / EXPORT_DIR, tokenizer)


def finetune_train_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function (its output in the stage's log file; the driver shows progress)."""
    plan = FinetunePlan(**loop_config["plan"])
    with worker_output_to_log(plan.stage_dir):
        _finetune_train_worker(loop_config, plan)


def describe_epoch(metrics: dict) -> str:
    return f"epoch {metrics['epoch']}: {_headline(metrics, 'dev/')}"


def _finetune_train_worker(loop_config: dict, plan: FinetunePlan) -> None:
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    console_logging()
    config = Config.model_validate(loop_config["config"])
    settings = config.finetune
    torch.set_num_threads(max(1, int(config.cluster.cpus_per_worker)))
    rank = ray.train.get_context().get_world_rank()
    tokenizer = AutoTokenizer.from_pretrained(plan.encoder_dir)
    trainer = build_nlu_trainer(config, plan, settings.steps_per_epoch(loop_config["train_rows"]))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load_state(torch.load(Path(directory) / STATE_FILE, weights_only=True))
        logger.info("rank %d resumed after epoch %d", rank, trainer.epoch)
    forward = ray.train.torch.prepare_model(trainer.model)
    shard = ray.train.get_dataset_shard("train")

    def epoch_batches(epoch: int):
        return shard.iter_batches(
            batch_size=settings.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=8 * settings.batch_size,
            local_shuffle_seed=config.seed + epoch,
        )

    progress = StageProgress(plan.stage_dir, trainer.max_epochs, trainer.epoch, describe_epoch,
                             config.tracking.tensorboard, unit="epoch") if rank == 0 else None

    def report(metrics: dict, trainer: NluTrainer) -> None:
        if rank != 0:
            ray.train.report(metrics)
            return
        progress.evaluated(metrics)
        with tempfile.TemporaryDirectory(prefix="atm-ray-finetune-") as directory:
            _save_state(directory, trainer, tokenizer)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    fit(trainer, forward, epoch_batches, loop_config["dev"], tokenizer, ray.train.torch.get_device(), report)
    if progress:
        progress.close()


def _records_dataset(encoded: dict[str, np.ndarray]):
    import ray.data

    return ray.data.from_items([{name: array[row] for name, array in encoded.items()} for row in range(len(encoded["intent_labels"]))])


def _encoded(plan: FinetunePlan, records: list[dict], max_seq_len: int) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plan.encoder_dir)
    return encode_records(tokenizer, records, plan.intent_labels, plan.slot_labels, max_seq_len, plan.lowercase)


def run_finetune_stage(config: Config, plan: FinetunePlan, data: NluData, use_ray: bool = True) -> dict:
    """Run (or resume, or skip when finished) one fine-tuning stage; returns its manifest."""
    done = up_to_date(plan.stage_dir, plan.config_hash)
    if done:
        return done
    check_tracking(config.tracking)
    Path(plan.stage_dir).mkdir(parents=True, exist_ok=True)
    settings = config.finetune
    encoded = _encoded(plan, data.train, settings.max_seq_len)
    logger.info(
        "[%s] %d train / %d dev / %d test utterances, %d intents, %d slot tags, %s%s",
        plan.name, len(data.train), len(data.dev), len(data.test), len(plan.intent_labels) - 1, len(plan.slot_labels) - 1,
        "scratch" if plan.scratch else "from " + plan.encoder_dir, ", frozen encoder" if settings.freeze_encoder else "",
    )
    if not use_ray:
        return _finish(config, plan, data, _fit_here(config, plan, data, encoded))
    loop_config = {"config": config.model_dump(mode="json"), "plan": asdict(plan), "dev": data.dev, "train_rows": len(data.train)}
    result = fit_with_ray(
        config, finetune_train_worker, loop_config, stage_dir=plan.stage_dir, name=plan.name, config_hash=plan.config_hash,
        num_workers=settings.num_workers, datasets={"train": _records_dataset(encoded)}, describe=describe_epoch,
    )
    with result.checkpoint.as_directory() as directory:
        return _finish(config, plan, data, Path(directory))


def _fit_here(config: Config, plan: FinetunePlan, data: NluData, encoded: dict[str, np.ndarray]) -> Path:
    """The same loop in this process: checkpoints under ``<stage>/checkpoints/latest`` after each epoch."""
    from transformers import AutoTokenizer

    settings = config.finetune
    tokenizer = AutoTokenizer.from_pretrained(plan.encoder_dir)
    trainer = build_nlu_trainer(config, plan, settings.steps_per_epoch(len(data.train)))
    # a GPU when there is one (under Ray, Ray Train picks the device); the optimiser keeps its parameters,
    # which Module.to moves in place
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer.model.to(device)
    # keyed by the config hash: a changed configuration never resumes (or publishes) another one's state
    latest = Path(plan.stage_dir) / "checkpoints" / plan.config_hash / "latest"
    if (latest / STATE_FILE).is_file():
        trainer.load_state(torch.load(latest / STATE_FILE, weights_only=True))
    rows = len(encoded["intent_labels"])

    def epoch_batches(epoch: int):
        order = np.random.default_rng(config.seed + epoch).permutation(rows)
        for start in range(0, rows, settings.batch_size):
            picked = order[start : start + settings.batch_size]
            yield {name: array[picked] for name, array in encoded.items()}

    progress = StageProgress(plan.stage_dir, trainer.max_epochs, trainer.epoch, describe_epoch,
                             config.tracking.tensorboard, unit="epoch", bar=True)

    def report(metrics: dict, trainer: NluTrainer) -> None:
        partial = latest.parent / ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _save_state(str(partial), trainer, tokenizer)
        shutil.rmtree(latest, ignore_errors=True)
        partial.replace(latest)
        progress.evaluated(metrics)  # after the checkpoint: what it says is on disk

    fit(trainer, trainer.model, epoch_batches, data.dev, tokenizer, device, report)
    progress.close()
    return latest


def finetune_summary(manifest: dict) -> str:
    """What a finished fine-tuning stage prints: where its export is, its dev and test scores."""
    metrics = manifest["metrics"]
    lines = [f"{manifest['stage']}: export in {manifest['outputs']['export']} (best epoch {metrics['best_epoch']})"]
    lines += [f"  {split}: {_headline(metrics, split + '/')}" for split in ("dev", "test")]
    return "\n".join(lines)


def _headline(metrics: dict, prefix: str) -> str:
    return ", ".join(f"{name} {metrics[prefix + name]:.4f}" for name in ("intent_accuracy", "slot_f1", "exact_match"))


def _finish(config: Config, plan: FinetunePlan, data: NluData, final_checkpoint: Path) -> dict:
    """Export, dev/test scores, model card and manifest from the final checkpoint."""
    from atm_ray.nlu.model import Parser

    history = torch.load(final_checkpoint / STATE_FILE, weights_only=True)["history"]
    best = max(history, key=lambda metrics: metrics["dev/exact_match"])
    manifest = {"stage": plan.name, "config_hash": plan.config_hash,
                "inputs": {"parent": plan.parent, "train_records": len(data.train), "sources": data.reports}}
    params = {"config_hash": plan.config_hash, "seed": config.seed, "parent": plan.parent, "scratch": plan.scratch,
              "settings": config.finetune.model_dump(mode="json")}
    final: dict = {}
    with publish_stage(plan.stage_dir, final_checkpoint, history, manifest, tracking=config.tracking, params=params,
                       step_key="epoch", final_metrics=final) as staging:
        test = nlu_scores(data.test, Parser(staging).predict([record["tokens"] for record in data.test]))
        atomic_write_text(staging / "README.md", model_card(config, plan, data, best, test))
        atomic_write_json(Path(plan.stage_dir) / "test_scores.json", test)
        final.update({f"test/{name}": value for name, value in test.items() if name != "by_lang"})
        manifest["metrics"] = {
            "best_epoch": best["epoch"],
            "epochs": len(history),
            **{key: value for key, value in best.items() if key.startswith("dev/")},
            **final,
        }
    return manifest


def card_metadata(config: Config, plan: FinetunePlan, test: dict) -> str:
    """The model card's YAML block, as the Hugging Face Hub reads it (model-index holds the test scores)."""
    import yaml

    sources = config.finetune.train + config.finetune.test
    # a source is a split file or folder inside its dataset's folder: nlu/snips/train -> snips
    datasets = sorted({Path(source.path.removeprefix("bundled:")).parent.name or Path(source.path).stem for source in sources})
    languages = sorted(lang for lang in test["by_lang"] if lang and lang.isalpha() and len(lang) <= 3)
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "token-classification",
        "tags": ["atm-ray", "joint-intent-slot", "intent-classification", "slot-filling", "distillation"],
        **({"language": languages} if languages else {}),
        "datasets": datasets,
        "base_model": str(plan.parent),
        "model-index": [{
            "name": plan.name,
            "results": [{
                "task": {"type": "token-classification", "name": "joint intent classification and slot filling"},
                "dataset": {"name": ", ".join(datasets), "type": datasets[0] if datasets else "custom", "split": "test"},
                "metrics": [
                    {"type": "accuracy", "name": "intent accuracy", "value": round(100 * test["intent_accuracy"], 2)},
                    {"type": "f1", "name": "slot F1", "value": round(100 * test["slot_f1"], 2)},
                    {"type": "exact_match", "name": "exact match", "value": round(100 * test["exact_match"], 2)},
                ],
            }],
        }],
    }
    return yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)


def model_card(config: Config, plan: FinetunePlan, data: NluData, best: dict, test: dict) -> str:
    settings = config.finetune
    max_epochs, patience = settings.schedule(settings.steps_per_epoch(len(data.train)))
    sources = "\n".join(f"- {line}" for line in data.reports)
    by_lang = "\n".join(
        f"| {lang} | {scores['count']} | {100 * scores['intent_accuracy']:.2f} | {100 * scores['slot_f1']:.2f} | "
        f"{100 * scores['exact_match']:.2f} |"
        for lang, scores in test["by_lang"].items()
    )
    return f"""---
{card_metadata(config, plan, test)}---

# atm-ray joint intent + slot model ({plan.name})

A pre-LayerNorm RoBERTa encoder with an intent head (first token) and a slot head (first sub-word of
each word), fine-tuned by atm-ray (preset `{config.name}`). Parse with
`atm_ray.nlu.Parser("{plan.name}/export").parse(["set an alarm for 7 am"])`, or load the model with
transformers' `AutoModel.from_pretrained("{plan.name}/export")` after `import atm_ray` (no remote code).

## Parent model
{plan.parent}

## Data
{sources}

{len(plan.intent_labels) - 1} intents and {len(plan.slot_labels) - 1} slot tags from the training split
(labels seen only in dev/test map to `<unknown>`); text lower-cased: {plan.lowercase}.

## Training
{"frozen encoder (heads only)" if settings.freeze_encoder else "full fine-tuning"}; learning rate
{settings.learning_rate}, batch {settings.batch_size} per worker × {settings.num_workers} workers, slot loss
weight {settings.slot_loss_weight}, early stopping on dev exact match (patience {patience});
best epoch {best["epoch"]} of {max_epochs}.

## Metrics
| split | intent accuracy | slot F1 | exact match |
|---|---:|---:|---:|
| dev (best epoch) | {100 * best["dev/intent_accuracy"]:.2f} | {100 * best["dev/slot_f1"]:.2f} | {100 * best["dev/exact_match"]:.2f} |
| test | {100 * test["intent_accuracy"]:.2f} | {100 * test["slot_f1"]:.2f} | {100 * test["exact_match"]:.2f} |

Test by language:

| language | n | intent accuracy | slot F1 | exact match |
|---|---:|---:|---:|---:|
{by_lang}
"""


def run_finetune(
    config: Config,
    model_dir: Path | None = None,
    *,
    scratch: bool = False,
    name: str | None = None,
    run_dir: Path | None = None,
    use_ray: bool = True,
) -> dict:
    """Fine-tune ``model_dir`` (default: the run's final student) or, with ``scratch``, the same
    architecture from random weights; returns the stage manifest."""
    run_dir = Path(run_dir or config.resolved_run_dir())
    model_dir = Path(model_dir or run_dir / FINAL_DISTILL / EXPORT_DIR)
    data = load_nlu_data(config.finetune, config.data.root, config.data.strict, config.seed)
    name = name or (FINETUNE_SCRATCH if scratch else FINETUNE_STUDENT)
    plan = plan_finetune(config, data, model_dir, name, scratch, run_dir)
    return run_finetune_stage(config, plan, data, use_ray)
