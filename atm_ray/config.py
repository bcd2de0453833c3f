"""Typed configuration: YAML presets validated by pydantic, overridable as ``key.sub=value``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from atm_ray.utils import settings_hash

PRESETS = ("tiny", "cpu", "paper")
# how a fine-tuned model runs for serving and prediction (atm_ray.nlu.model.Parser): ONNX Runtime, the
# fastest on a CPU and the default of `atm-ray serve`/`predict`, or torch (eager; also GPUs)
INFERENCE_BACKENDS = ("onnxruntime", "torch")


class AtmRayError(ValueError):
    """A mistake a user can fix (settings, data, arguments): the CLI prints its message, not a traceback.
    Anything else that goes wrong is a bug and keeps its traceback."""


class ConfigError(AtmRayError):
    """A configuration a user wrote is wrong; the message names the key and the reason."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelShape(Strict):
    """Shape of one pre-LayerNorm RoBERTa encoder."""

    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    max_positions: int = Field(default=130, gt=2)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelShape":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        return self


TextFormat = Literal["text", "conllu", "wikiann", "tatoeba", "slurp"]
NluFormat = Literal["jointbert", "slurp", "massive", "xsid", "hwu64", "schuster"]


class Source(Strict):
    """One corpus file. ``path`` is local (relative to ``data.root``), ``bundled:<file>`` for the
    slice shipped in the package, or a pyarrow filesystem URI such as ``s3://bucket/file``."""

    format: TextFormat
    path: str
    lang: str | None = None
    max_records: int | None = Field(default=None, gt=0)


class CorpusConfig(Strict):
    train: list[Source] = Field(min_length=1)
    heldout: list[Source] = Field(default_factory=list)
    # Used only when ``heldout`` is empty: this share of ``train`` is held out instead.
    heldout_fraction: float = Field(default=0.02, ge=0.0, lt=0.5)
    spoken_form: bool = False


class NluSource(Strict):
    """One labelled intent/slot file or folder (paths as in ``Source``)."""

    format: NluFormat
    path: str
    lang: str | None = None
    max_records: int | None = Field(default=None, gt=0)


class DataConfig(Strict):
    root: str = "../shared/data"
    written: CorpusConfig
    spoken: CorpusConfig
    max_seq_len: int = Field(default=128, gt=4)
    strict: bool = True
    num_proc: int = Field(default=1, ge=1)
    shard_rows: int = Field(default=4096, gt=0)
    # Pretraining text that also appears in a held-out or evaluation set is dropped from training (lower
    # case, punctuation ignored): the held-out texts of both domains, finetune.dev and finetune.test, and
    # these sets. Public assistant corpora overlap: xSID's English training text holds 470 of SNIPS's 700
    # test utterances, and a student that saw them in pretraining is not measured fairly.
    decontaminate: bool = True
    exclude: list[NluSource] = Field(default_factory=list)


class TokenizerConfig(Strict):
    vocab_size: int = Field(gt=16)
    # lower-case everything (an uncased model): written text then shares its pieces with spoken-form
    # text, which is lower case, as speech recognition writes it
    lowercase: bool = False
    max_sentence_length: int = Field(default=4096, gt=0)


class EngineConfig(Strict):
    """DeepSpeed engine settings for one stage."""

    zero_stage: Literal[0, 1, 2, 3] = 1
    # autocast_bf16: fp32 weights and optimizer, bf16 matmuls via torch.autocast (DeepSpeed torch_autocast)
    precision: Literal["fp32", "bf16", "fp16", "autocast_bf16"] = "fp32"
    optimizer: Literal["torch_adamw", "fused_adam", "torch_fused_adamw"] = "torch_adamw"
    micro_batch_size: int = Field(default=8, gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    learning_rate: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    gradient_clipping: float = Field(default=1.0, ge=0)


class StageConfig(Strict):
    steps: int = Field(gt=0)
    eval_every: int = Field(default=50, gt=0)
    eval_batches: int = Field(default=4, gt=0)
    checkpoint_every: int = Field(default=100, gt=0)
    # Share of each batch drawn from Stage-1 written data during Stage 2 (0 = none).
    replay_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    engine: EngineConfig = Field(default_factory=EngineConfig)


class LossWeights(Strict):
    mlm: float = Field(default=1.0, ge=0)
    soft_ce: float = Field(default=1.0, ge=0)
    hidden: float = Field(default=0.0, ge=0)
    attention: float = Field(default=0.0, ge=0)


# the two kinds of text: every masked-LM stage trains on one (with a replay share of the other) and is
# scored on both
DOMAINS = ("written", "spoken")

# Which way is better for every metric a switch or a sweep may compare: a table, not a guess from names.
HELDOUT_DIRECTIONS = {
    "mlm_loss": "min", "perplexity": "min", "mask_fill_accuracy": "max", "noun_mask_fill_accuracy": "max",
    "teacher_perplexity": "min", "teacher_mask_fill_accuracy": "max", "teacher_noun_mask_fill_accuracy": "max",
    "perplexity_gap": "min", "mask_fill_accuracy_gap": "min",
}
LOSS_TERMS = ("train_loss", "mlm_loss", "soft_ce_loss", "hidden_loss", "attention_loss")
DOWNSTREAM_METRICS = tuple(f"downstream/{name}" for name in ("intent_accuracy", "slot_f1", "exact_match"))
METRIC_DIRECTIONS: dict[str, str] = {
    **{f"{domain}/{name}": mode for domain in DOMAINS for name, mode in HELDOUT_DIRECTIONS.items()},
    **{term: "min" for term in LOSS_TERMS},
    **{metric: "max" for metric in DOWNSTREAM_METRICS},
}


def metric_direction(metric: str, field: str) -> Literal["min", "max"]:
    """``min`` or ``max`` for a known metric; a ``ValueError`` naming ``field`` for any other."""
    if metric not in METRIC_DIRECTIONS:
        raise ValueError(f"{field}: {metric!r} is not a reported metric; one of {sorted(METRIC_DIRECTIONS)}")
    return METRIC_DIRECTIONS[metric]  # type: ignore[return-value]


class TeacherSwitch(Strict):
    """When to move from the Stage-1 to the Stage-2 teacher: a plateau of the held-out ``metric`` (no gain
    of ``min_delta`` for ``patience`` evaluations; ``mode`` says whether lower or higher is a gain, by
    default the metric's own direction), or ``max_steps`` at the latest."""

    metric: str = "written/mlm_loss"
    mode: Literal["min", "max"] | None = None
    patience: int = Field(default=2, gt=0)
    min_delta: float = Field(default=0.01, ge=0)
    max_steps: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _held_out_metric(self) -> "TeacherSwitch":
        if self.metric.partition("/")[0] not in DOMAINS:
            raise ValueError(f"metric: {self.metric!r} is not a held-out metric (written/... or spoken/...)")
        direction = metric_direction(self.metric, "metric")
        if self.mode is None:
            self.mode = direction
        return self


class DistillStageConfig(StageConfig):
    student: str
    # share of each batch drawn from spoken text (the rest is written)
    spoken_fraction: float = Field(default=0.5, ge=0.0, lt=1.0)
    temperature: float = Field(default=2.0, gt=0)
    soft_targets: Literal["masked", "all"] = "masked"
    weights: LossWeights = Field(default_factory=LossWeights)
    # student layer m (0 = embeddings) learns from teacher layer layer_map[m]; default uniform k*m
    layer_map: list[int] | None = None
    init: Literal["random", "teacher_layers"] = "random"
    switch: TeacherSwitch | None = None


class DistillConfig(Strict):
    intermediate: DistillStageConfig
    # MLM-only continued pretraining of the intermediate student on in-domain spoken text
    continuation: StageConfig
    final: DistillStageConfig


class ClusterConfig(Strict):
    address: str | None = None
    num_workers: int = Field(default=1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    max_failures: int = Field(default=0, ge=-1)
    num_to_keep: int = Field(default=2, gt=0)
    storage_path: str | None = None


class FinetuneConfig(Strict):
    """Joint intent classification + slot filling on labelled data (the pipeline's last training stage)."""

    train: list[NluSource] = Field(min_length=1)
    # Empty dev or test: that share of the training records is held out instead (seeded).
    dev: list[NluSource] = Field(default_factory=list)
    test: list[NluSource] = Field(default_factory=list)
    dev_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    max_seq_len: int = Field(default=64, gt=4)
    max_epochs: int = Field(default=10, gt=0)
    # early stopping: evaluations on dev without a gain in exact match before training stops
    patience: int = Field(default=3, gt=0)
    # a budget in optimizer steps as well as epochs: a small labelled set (SLURP devel: 52 steps an epoch)
    # gets as many more epochs as reach it, and a patience raised in proportion; 0: epochs alone
    min_steps: int = Field(default=0, ge=0)
    batch_size: int = Field(default=32, gt=0)
    learning_rate: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1)
    slot_loss_weight: float = Field(default=1.0, ge=0)
    head_dropout: float = Field(default=0.1, ge=0, lt=1)
    # what the intent head reads: the first token's state, or the mean over the utterance's tokens
    intent_pooling: Literal["first", "mean"] = "first"
    freeze_encoder: bool = False
    num_workers: int = Field(default=1, gt=0)

    def steps_per_epoch(self, rows: int) -> int:
        """Optimizer steps an epoch of ``rows`` training utterances makes on each worker."""
        return max(1, -(-(rows // self.num_workers) // self.batch_size))

    def schedule(self, steps_per_epoch: int) -> tuple[int, int]:
        """(epochs, patience) for a training set of ``steps_per_epoch`` optimizer steps an epoch."""
        epochs = max(self.max_epochs, -(-self.min_steps // max(1, steps_per_epoch)))
        return epochs, -(-self.patience * epochs // self.max_epochs)


class SweepParameter(Strict):
    """One swept value: ``values`` (a grid, or a choice under random search) or a range ``low``..``high``
    (uniform, or log-uniform with ``log: true``; random search only)."""

    values: list[float] | None = Field(default=None, min_length=1)
    low: float | None = None
    high: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _values_or_range(self) -> "SweepParameter":
        if (self.values is None) == (self.low is None or self.high is None):
            raise ValueError("give either values or both low and high")
        if self.low is not None and self.high is not None:
            if self.low >= self.high:
                raise ValueError(f"low {self.low} is not below high {self.high}")
            if self.log and self.low <= 0:
                raise ValueError("a log range needs low > 0")
        return self


class DownstreamConfig(Strict):
    """A short fine-tune of each trial's student on ``finetune``'s data; adds ``downstream/*`` dev scores."""

    epochs: int = Field(default=2, gt=0)
    max_train_records: int | None = Field(default=2000, gt=0)


class SweepConfig(Strict):
    """A Ray Tune search over one distillation stage's settings (``atm-ray sweep``)."""

    student: Literal["intermediate", "final"] = "final"
    search: Literal["grid", "random"] = "random"
    # random: the number of trials; grid: how many times the whole grid runs
    num_samples: int = Field(default=8, gt=0)
    # keys under distill.<student>, e.g. weights.soft_ce, temperature, engine.learning_rate
    space: dict[str, SweepParameter] = Field(
        default_factory=lambda: {
            "weights.soft_ce": SweepParameter(low=0.25, high=4.0, log=True),
            "weights.mlm": SweepParameter(low=0.25, high=4.0, log=True),
            "weights.hidden": SweepParameter(low=0.1, high=4.0, log=True),
            "temperature": SweepParameter(values=[1.0, 2.0, 4.0]),
            "engine.learning_rate": SweepParameter(low=2e-4, high=3e-3, log=True),
        }
    )
    steps: int | None = Field(default=None, gt=0)  # each trial's length (default: the stage's steps)
    eval_every: int | None = Field(default=None, gt=0)  # also each trial's checkpoint interval
    metric: str = "spoken/mask_fill_accuracy"  # what ASHA compares, reported at every evaluation
    mode: Literal["max", "min"] | None = None  # default: the metric's own direction
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int | None = Field(default=None, gt=0)  # steps before ASHA may stop a trial (default: 2 evaluations)
    reduction_factor: float = Field(default=2.0, gt=1.0)
    max_concurrent_trials: int = Field(default=2, gt=0)
    cpus_per_trial: float = Field(default=0.5, gt=0)  # the Tune trial itself (it drives its own Ray Train run)
    num_workers: int = Field(default=1, gt=0)
    cpus_per_worker: float = Field(default=0.5, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    downstream: DownstreamConfig | None = None
    # what picks the best trial: metric by default; downstream/exact_match needs downstream
    select_by: str | None = None
    select_mode: Literal["max", "min"] | None = None

    @model_validator(mode="after")
    def _grid_has_values(self) -> "SweepConfig":
        if not self.space:
            raise ValueError("space: nothing to sweep")
        if self.search == "grid":
            for key, parameter in self.space.items():
                if parameter.values is None:
                    raise ValueError(f"space.{key}: grid search needs a list of values")
        if (self.select_by or "").startswith("downstream/") and self.downstream is None:
            raise ValueError(f"select_by {self.select_by} needs sweep.downstream")
        if self.metric in DOWNSTREAM_METRICS:
            raise ValueError(f"metric: {self.metric} is measured once per trial, not at every evaluation; use select_by")
        if self.mode is None:
            self.mode = metric_direction(self.metric, "metric")
        if self.select_mode is None:
            self.select_mode = self.mode if not self.select_by else metric_direction(self.select_by, "select_by")
        return self


class PretrainConfig(Strict):
    model: str = "teacher"
    mask_probability: float = Field(default=0.15, gt=0, lt=1)
    stage1: StageConfig
    stage2: StageConfig


class TrackingConfig(Strict):
    """Where every training stage's parameters, metrics and export are recorded besides its folder:
    TensorBoard event files under ``<run>/<stage>/tensorboard`` (live), and MLflow when ``mlflow_uri`` is
    set (``pip install atm-ray[mlflow]``; e.g. ``file:///abs/path/mlruns``, ``sqlite:///mlflow.db``,
    ``http://host:5000``), one MLflow run per stage when it finishes."""

    tensorboard: bool = True
    mlflow_uri: str | None = None
    mlflow_experiment: str = "atm-ray"


class TeachersConfig(Strict):
    """Teachers you already have: ``save_pretrained`` folders of any ``AutoModelForMaskedLM`` (BERT, RoBERTa,
    XLM-R, DeBERTa-v2, ...) with their tokenizer, weights in safetensors. A given teacher replaces the
    stage that would train it, and its tokenizer replaces the one ``prepare`` would train: the data, the
    students, fine-tuning and serving all use it.

    ``stage2`` unset: Stage 2 continues the given Stage-1 teacher's masked LM on spoken text (the recipe);
    a folder: that teacher, no Stage 2; ``skip``: no Stage 2, the Stage-1 teacher teaches throughout."""

    stage1: str | None = None
    stage2: str | None = None

    @model_validator(mode="after")
    def _stage1_first(self) -> "TeachersConfig":
        if self.stage2 is not None and self.stage1 is None:
            raise ValueError("stage2 needs stage1 too (the Stage-1 teacher and the tokenizer): give teachers.stage1")
        return self


class Config(Strict):
    name: str
    seed: int = 0
    run_dir: str = "runs/{name}"
    data: DataConfig
    tokenizer: TokenizerConfig
    models: dict[str, ModelShape]
    pretrain: PretrainConfig
    distill: DistillConfig
    finetune: FinetuneConfig
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    teachers: TeachersConfig = Field(default_factory=TeachersConfig)

    @model_validator(mode="after")
    def _models_exist(self) -> "Config":
        named = {"pretrain.model": self.pretrain.model}
        named.update({f"distill.{name}.student": getattr(self.distill, name).student for name in ("intermediate", "final")})
        for key, model in named.items():
            if model not in self.models:
                raise ValueError(f"{key} names {model!r}, not one of models: {sorted(self.models)}")
        # a layer map is checked here, not an hour later when its stage starts: one entry per student layer
        # plus the embeddings, each a layer of the stage's teacher (the intermediate's when it is ours)
        teachers = {"intermediate": None if self.teachers.stage1 else self.pretrain.model, "final": self.distill.intermediate.student}
        for name, teacher in teachers.items():
            settings = getattr(self.distill, name)
            if settings.layer_map is None:
                continue
            student_layers = self.models[settings.student].num_layers
            top = self.models[teacher].num_layers if teacher else None
            if len(settings.layer_map) != student_layers + 1 or any(layer < 0 or (top is not None and layer > top) for layer in settings.layer_map):
                raise ValueError(
                    f"distill.{name}.layer_map {settings.layer_map}: needs {student_layers + 1} entries (embeddings, then each "
                    f"of models.{settings.student}'s {student_layers} layers), each a teacher layer 0..{top if top is not None else 'N'}"
                )
        for name, shape in self.models.items():  # position tables must hold every row the stages feed them
            for key, length in (("data.max_seq_len", self.data.max_seq_len), ("finetune.max_seq_len", self.finetune.max_seq_len)):
                if length > shape.max_positions:
                    raise ValueError(f"{key} {length} is longer than models.{name}.max_positions {shape.max_positions}")
        return self

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir.format(name=self.name))

    def section_hash(self, *keys: str) -> str:
        """Stable hash of the named top-level sections, for stage manifests."""
        dump = self.model_dump(mode="json")
        picked = {key: dump[key] for key in keys}
        return settings_hash(picked)


def _format_validation_error(error: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "<root>"
        reason = problem["msg"]
        if problem["type"] == "extra_forbidden":
            reason = "unknown key"
        lines.append(f"  {key}: {reason}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw_value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw_value) if raw_value else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {key}: value {raw_value!r} is not valid YAML ({error})") from None
    return key.split("."), value


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    node: Any = tree
    for depth, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_list_index(path, depth, len(node))]
            continue
        if part not in node or not isinstance(node[part], (dict, list)):
            if part in node:
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: depth + 1])} is not a section")
            node[part] = {}
        node = node[part]
    if isinstance(node, list):
        node[_list_index(path, len(path) - 1, len(node))] = value
    else:
        node[path[-1]] = value


def _list_index(path: list[str], depth: int, length: int) -> int:
    part = path[depth]
    if not part.isdigit() or int(part) >= length:
        raise ConfigError(
            f"override {'.'.join(path)}: {part!r} is not an index of {'.'.join(path[:depth])} "
            f"(a list of {length})"
        )
    return int(part)


def load_preset_tree(preset: str) -> dict:
    if preset in PRESETS:
        text = resources.files("atm_ray.presets").joinpath(f"{preset}.yaml").read_text()
    else:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"preset {preset!r} is neither one of {PRESETS} nor a YAML file")
        text = path.read_text()
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"preset {preset}: not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"preset {preset}: top level must be a mapping")
    return tree


def read_override_file(path: str | Path) -> list[tuple[list[str], Any]]:
    """The leaves of a YAML mapping (such as a sweep's ``best_overrides.yaml``) as override paths."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"override file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"override file {path}: not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"override file {path}: top level must be a mapping")
    leaves: list[tuple[list[str], Any]] = []

    def walk(node: dict, prefix: list[str]) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, [*prefix, str(key)])
            else:
                leaves.append(([*prefix, str(key)], value))

    walk(tree, [])
    return leaves


def load_config(
    preset: str, overrides: list[str] | tuple[str, ...] = (), override_files: list[str] | tuple[str, ...] = ()
) -> Config:
    """Load a preset by name (or a YAML path), apply override files (YAML mappings, in order), then
    ``key.sub=value`` overrides."""
    tree = load_preset_tree(preset)
    for path in override_files:
        for keys, value in read_override_file(path):
            apply_override(tree, keys, value)
    for override in overrides:
        apply_override(tree, *parse_override(override))
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        origin = f"preset {preset}"
        if override_files:
            origin += f" with override files {[str(path) for path in override_files]}"
        if overrides:
            origin += f" with overrides {list(overrides)}"
        raise ConfigError(_format_validation_error(error, origin)) from None
