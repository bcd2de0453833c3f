"""The DeepSpeed engine loop for masked-LM training. No Ray import: Ray Train only drives it.

``MlmTrainer`` wraps ``deepspeed.initialize`` (ZeRO 0-3, fp32 / bf16 / fp16 / bf16 autocast, gradient
accumulation, clipping, warm-up then linear decay), the train step, held-out evaluation, checkpoints
(model, optimizer, scheduler, RNG, data position) and the ``save_pretrained`` export.
``run_training`` is the loop itself; it calls ``report(metrics, checkpoint_dir)`` at each interval,
which Ray Train's driver turns into ``ray.train.report`` and the single-process runner into files.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from atm_ray.config import AtmRayError, EngineConfig
from atm_ray.data.masking import IGNORE_INDEX, MaskingCollator
from atm_ray.data.tokenizer import SpecialTokens

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "state"
EXPORT_DIR = "export"
HISTORY_FILE = "history.json"


def init_single_process_group() -> None:
    """Rendezvous variables for one process without a launcher (torchrun and Ray Train set their own)."""
    import socket

    if torch.distributed.is_initialized():
        return
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as handle:
            handle.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(handle.getsockname()[1])


def _configure_deepspeed_environment() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@contextlib.contextmanager
def _op_build_lock() -> Iterator[None]:
    """DeepSpeed builds its ops on first use (on the CPU backend: the shared-memory all-reduce) through
    torch's JIT loader, whose only guard is a bare ``lock`` file in the op's build folder that nobody
    removes when the builder is killed (Ctrl-C or a timeout during the first run): every later run then
    waits on it forever, silently, its output in a log file. Our builders take this flock first, which the
    kernel drops with its holder, so a ``lock`` file found while holding it is stale."""
    import fcntl

    from torch.utils.cpp_extension import get_default_build_root

    # torch's layout: $TORCH_EXTENSIONS_DIR/<op>/ or <default root>/py311_cpu/<op>/
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "atm-ray-build.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for stale in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
                logger.warning("removing %s, left by an op build that was killed", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_deepspeed_ops(world_size: int) -> None:
    """Build (or load the cached build of) the ops DeepSpeed's communication backend loads in
    ``init_distributed``, before it does: there the build would run while other ranks wait in the
    rendezvous, so it cannot be done under a lock shared with them. A single process has no peer to
    all-reduce with through shared memory, so there the op is marked unavailable instead: DeepSpeed's
    backend then skips it rather than JIT-compiling it (124 s on a 2-core machine, once per machine, in
    the first stage of every fresh install's first run)."""
    _configure_deepspeed_environment()
    if world_size == 1:
        import deepspeed.ops

        # the module caches its probe in this dict and reads it again when the backend starts
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        return
    from deepspeed.comm.torch import build_shm_op

    with _op_build_lock(), contextlib.redirect_stdout(io.StringIO()):  # its "built successfully": DeepSpeed prints it again
        build_shm_op()  # None where the accelerator has no such op (CUDA)


def clips_outside_deepspeed(engine: EngineConfig) -> bool:
    """Without ZeRO, gradients sit on the parameters and torch's fused (foreach) clipping is used:
    DeepSpeed's own clips parameter by parameter from Python, which costs ~5% of a 2.3B model's step
    on an H200. ZeRO and DeepSpeed's bf16 optimizer keep gradients in their own buffers and clip there."""
    return engine.zero_stage == 0 and engine.precision in ("fp32", "autocast_bf16") and engine.gradient_clipping > 0


def deepspeed_config(engine: EngineConfig, world_size: int) -> dict:
    config: dict = {
        "train_micro_batch_size_per_gpu": engine.micro_batch_size,
        "gradient_accumulation_steps": engine.gradient_accumulation_steps,
        "train_batch_size": engine.micro_batch_size * engine.gradient_accumulation_steps * world_size,
        "gradient_clipping": 0.0 if clips_outside_deepspeed(engine) else engine.gradient_clipping,
        "zero_optimization": {"stage": engine.zero_stage},
        # our AdamW objects are torch's own, which DeepSpeed has not listed as tested with ZeRO
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        # DeepSpeed's throughput timer synchronises the device twice a step, which stops the host from
        # queuing the next step's kernels; the loop measures tokens/s itself.
        "timers": {"throughput": {"enabled": False}},
        "wall_clock_breakdown": False,
    }
    if engine.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif engine.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    elif engine.precision == "autocast_bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if engine.optimizer == "fused_adam":
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": engine.learning_rate, "weight_decay": engine.weight_decay, "betas": [0.9, 0.98], "eps": 1e-6},
        }
    return config


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "LayerNorm" in name else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def parameter_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of a model's weights (to check one stage really starts from another)."""
    with torch.no_grad():
        return float(sum(parameter.detach().double().abs().sum().item() for parameter in model.parameters()))


class MlmTrainer:
    """A masked-LM model inside a DeepSpeed engine."""

    def __init__(
        self,
        model: torch.nn.Module,
        engine_config: EngineConfig,
        total_steps: int,
        vocab_size: int,
        mask_probability: float = 0.15,
        seed: int = 0,
        special: SpecialTokens = SpecialTokens(),
    ):
        # Ray Train's workers have joined the process group already; a single process (--no-ray) has WORLD_SIZE
        initialized = torch.distributed.is_initialized()
        build_deepspeed_ops(torch.distributed.get_world_size() if initialized else int(os.environ.get("WORLD_SIZE", "1")))
        import deepspeed

        if not initialized:
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.engine_config = engine_config
        self.total_steps = total_steps
        self.vocab_size = vocab_size
        config = deepspeed_config(engine_config, self.world_size)
        optimizer = None
        if engine_config.optimizer != "fused_adam":
            optimizer = torch.optim.AdamW(
                parameter_groups(model, engine_config.weight_decay),
                lr=engine_config.learning_rate,
                betas=(0.9, 0.98),
                eps=1e-6,
                fused=engine_config.optimizer == "torch_fused_adamw",
            )
        from transformers import get_linear_schedule_with_warmup

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=None if optimizer else model.parameters(),
            optimizer=optimizer,
            lr_scheduler=lambda wrapped: get_linear_schedule_with_warmup(wrapped, engine_config.warmup_steps, total_steps),
            config=config,
            dist_init_required=False,
        )
        if self.world_size == 1 and engine_config.zero_stage == 0:
            # one rank has nothing to all-reduce: skip DeepSpeed's flatten/reduce/unflatten of every gradient
            self.engine.enable_backward_allreduce = False
        self.clip_here = clips_outside_deepspeed(engine_config)
        self._head_positions: torch.Tensor | None = None  # see compute_loss
        self._head_hook = None
        self.device = self.engine.device
        self.step = 0
        self.history: list[dict] = []
        self.special = special  # the tokenizer's ids: a teacher's tokenizer has its own
        self.collator = MaskingCollator(vocab_size, mask_probability, "random", seed=seed * 1000 + self.rank, special=special)
        self.mask_probability = mask_probability
        self.seed = seed

    # ------------------------------------------------------------------ training

    def train_step(self, micro_batches: list[dict]) -> tuple[torch.Tensor, int]:
        """One optimiser step over ``gradient_accumulation_steps`` micro-batches of packed rows.

        Returns this rank's mean loss as a device tensor (reading it would wait for the GPU, so the
        loop reads losses only when it reports) and the number of real (non-pad) tokens processed.
        """
        self.engine.train()
        loss_sum, tokens = None, 0
        for index, rows in enumerate(micro_batches):
            batch = self.collator(rows)
            tokens += int(batch["attention_mask"].sum())  # on the CPU: no wait for the GPU
            batch = {name: tensor.to(self.device, non_blocking=True) for name, tensor in batch.items()}
            loss = self.compute_loss(batch)
            self.engine.backward(loss)
            if self.clip_here and index == len(micro_batches) - 1:
                torch.nn.utils.clip_grad_norm_(self.engine.module.parameters(), self.engine_config.gradient_clipping)
            self.engine.step()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        self.step += 1
        return loss_sum / len(micro_batches), tokens

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def all_reduce_mean(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def replica_divergence(self) -> float:
        """Largest difference between the ranks' weight fingerprints: 0 when data parallelism is sound.

        Under ZeRO-3 each rank holds only a partition, so there is nothing to compare (NaN).
        """
        if self.engine_config.zero_stage == 3:
            return float("nan")
        checksum = torch.tensor([parameter_checksum(self.engine.module)], dtype=torch.float64, device=self.device)
        gathered = [torch.zeros_like(checksum) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, checksum)
        values = [value.item() for value in gathered]
        return max(values) - min(values)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, heldout: dict[str, np.ndarray], batches: int, batch_size: int, unigram_token: int | None = None) -> dict[str, float]:
        """Held-out metrics of the model in the engine (every rank runs the same batches: ZeRO-3 needs
        every rank in each forward)."""
        self.engine.eval()
        return masked_lm_metrics(self.engine, heldout, batches, batch_size, self.vocab_size, self.mask_probability, self.seed,
                                 self.device, unigram_token, self.special)

    # ------------------------------------------------------------------ hooks for subclasses

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The masked-LM loss, the LM head applied to the masked positions only: the loss of
        transformers' ``labels=`` path without the logits of the other 85% of positions (15-20% of a step
        for the small presets, whose head is a large part of the model). The forward still goes through
        the engine, which hooks its backward."""
        if self._head_hook is None:  # registered here: the distillation's students compute their own loss
            self._head_hook = self.engine.module.base_model.register_forward_hook(self._keep_head_positions)
        masked = batch["labels"] != IGNORE_INDEX
        self._head_positions = masked
        try:
            logits = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            self._head_positions = None
        return torch.nn.functional.cross_entropy(logits, batch["labels"][masked])

    def _keep_head_positions(self, module, args, output):
        """Forward hook on the encoder: while ``compute_loss`` runs, hand the head only the masked
        positions' hidden states (the model's own forward then returns logits for those alone)."""
        if self._head_positions is not None:
            output["last_hidden_state"] = output["last_hidden_state"][self._head_positions]
        return output

    def loss_terms(self) -> dict[str, float]:
        """Each loss term's mean since the last call (distillation logs them separately)."""
        return {}

    def after_evaluation(self, metrics: dict) -> None:
        """Called with each evaluation's metrics, identical on every rank."""

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what ``extra_state`` saved."""

    # ------------------------------------------------------------------ checkpoints and export

    def save_checkpoint(self, directory: str | Path, data_position: int) -> None:
        """Collective: every rank writes its ZeRO shards and its RNG state into ``directory``."""
        directory = Path(directory)
        client_state = {
            "step": self.step,
            "history": self.history,
            "data_position": data_position,
            "extra": self.extra_state(),
        }
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state=client_state)
        torch.save(
            {"torch": torch.get_rng_state(), "collator": self.collator.generator.get_state()},
            directory / f"rng_rank{self.rank}.pt",
        )
        if self.rank == 0:
            (directory / HISTORY_FILE).write_text(json.dumps(self.history, indent=1))

    def load_checkpoint(self, directory: str | Path) -> int:
        """Restore everything ``save_checkpoint`` wrote; returns the data position to continue from."""
        directory = Path(directory)
        _, client_state = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        if client_state is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint with tag {CHECKPOINT_TAG!r}")
        self.step = client_state["step"]
        self.history = client_state["history"]
        self.load_extra_state(client_state.get("extra", {}))
        rng_file = directory / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            states = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(states["torch"])
            self.collator.generator.set_state(states["collator"])
        return client_state["data_position"]

    def export_module(self) -> torch.nn.Module:
        """The model a stage publishes (a distillation trainer trains more than its student)."""
        return self.engine.module

    def export(self, directory: str | Path, tokenizer=None) -> None:
        """Collective under ZeRO-3; rank 0 writes ``save_pretrained`` (safetensors) and the tokenizer."""
        import deepspeed

        model = self.export_module()
        gathered = (
            deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
            if self.engine_config.zero_stage == 3
            else contextlib.nullcontext()
        )
        with gathered:
            if self.rank == 0:
                model.save_pretrained(str(directory), safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(directory))


@torch.no_grad()
def masked_lm_metrics(
    model: Callable,
    heldout: dict[str, np.ndarray],
    batches: int,
    batch_size: int,
    vocab_size: int,
    mask_probability: float,
    seed: int,
    device: torch.device,
    unigram_token: int | None = None,
    special: SpecialTokens = SpecialTokens(),
) -> dict[str, float]:
    """Masked-token loss, perplexity and top-1 mask filling on fixed masks, plus noun mask filling.

    The masks depend only on ``seed``, so a student and its teacher are scored on the same positions.
    With ``unigram_token`` (the most frequent training token), ``unigram_mask_fill_accuracy`` is what
    always guessing it scores on the same masks: the plateau a model must leave.
    """
    metrics: dict[str, float] = {}
    for mode in ("eval", "noun"):
        collator = MaskingCollator(vocab_size, mask_probability, mode, seed=seed + 12345, special=special)
        loss_sum, correct, unigram_correct, count = 0.0, 0, 0, 0
        rows = heldout["input_ids"]
        for start in range(0, min(len(rows), batches * batch_size), batch_size):
            batch = collator({name: column[start : start + batch_size] for name, column in heldout.items()})
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            chosen = batch["labels"] != IGNORE_INDEX
            chosen_logits = logits[chosen].float()
            targets = batch["labels"][chosen]
            loss_sum += torch.nn.functional.cross_entropy(chosen_logits, targets, reduction="sum").item()
            correct += int((chosen_logits.argmax(-1) == targets).sum())
            unigram_correct += int((targets == unigram_token).sum()) if unigram_token is not None else 0
            count += int(chosen.sum())
        if mode == "eval":
            loss = loss_sum / max(count, 1)
            metrics["mlm_loss"] = loss
            metrics["perplexity"] = math.exp(min(loss, 50.0))
            metrics["mask_fill_accuracy"] = correct / max(count, 1)
            if unigram_token is not None:
                metrics["unigram_mask_fill_accuracy"] = unigram_correct / max(count, 1)
        else:
            metrics["noun_mask_fill_accuracy"] = correct / count if count else float("nan")
            metrics["noun_masked_tokens"] = count
    return metrics


# ---------------------------------------------------------------------- data


class RowSource:
    """Packed rows in memory, iterated in a reproducible order: each epoch is a seeded permutation,
    split across ranks by stride, cut into fixed-size batches (the ragged end dropped)."""

    def __init__(self, columns: dict[str, np.ndarray], batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.columns, self.batch_size = columns, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        if len(columns["input_ids"]) // world_size < batch_size:
            raise AtmRayError(
                f"{len(columns['input_ids'])} rows cannot give each of {world_size} ranks a batch of {batch_size}"
            )

    def epoch(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.columns["input_ids"]))
        mine = order[self.rank :: self.world_size]
        for start in range(0, len(mine) - self.batch_size + 1, self.batch_size):
            index = mine[start : start + self.batch_size]
            yield {name: column[index] for name, column in self.columns.items()}


def read_rows(directory: str | Path) -> dict[str, np.ndarray]:
    table = pq.read_table(str(directory))
    return {name: np.asarray(table[name].to_pylist(), dtype=np.int64) for name in table.column_names}


def endless(source, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches from ``source.epoch(0)``, ``epoch(1)``, ... forever, after skipping ``skip`` of them."""
    epoch, position = 0, 0
    while True:
        produced = False
        for batch in source.epoch(epoch):
            produced = True
            if position >= skip:
                yield batch
            position += 1
        if not produced:
            raise AtmRayError("the training data gives no full batch")
        epoch += 1


def mixed(primary: Iterator[dict], replay: Iterator[dict] | None) -> Iterator[dict]:
    """Concatenate each primary batch with a replay batch (Stage-2 replay of Stage-1 data)."""
    for batch in primary:
        if replay is None:
            yield batch
        else:
            extra = next(replay)
            yield {name: np.concatenate([batch[name], extra[name]]) for name in batch}


def split_batch_size(micro_batch_size: int, replay_fraction: float) -> tuple[int, int]:
    replay = int(round(micro_batch_size * replay_fraction))
    if replay_fraction > 0 and replay == 0:
        replay = 1
    if replay >= micro_batch_size:
        raise AtmRayError(f"replay_fraction {replay_fraction} leaves no room in a batch of {micro_batch_size}")
    return micro_batch_size - replay, replay


# ---------------------------------------------------------------------- the loop


@dataclass
class LoopSettings:
    steps: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    eval_batch_size: int = 32
    # called after every optimiser step with (step, rank); the kill-and-resume tests inject faults with it
    on_step: Callable[[int, int], None] | None = None
    extra_metrics: dict = field(default_factory=dict)
    unigram_tokens: dict[str, int] = field(default_factory=dict)  # per domain, see masked_lm_metrics


def run_training(
    trainer: MlmTrainer,
    batches: Iterator[dict],
    heldout: dict[str, dict[str, np.ndarray]],
    settings: LoopSettings,
    report: Callable[[dict, str | None], None],
    checkpoint_dir: Callable[[], str],
    tokenizer=None,
) -> dict:
    """Train from ``trainer.step`` to ``settings.steps``; evaluate, checkpoint and report on intervals.

    ``batches`` must already be positioned at the trainer's data position (see ``endless(skip=...)``).
    ``checkpoint_dir()`` gives an empty folder for the next checkpoint; the last one also holds the
    ``save_pretrained`` export under ``export/`` and the metrics history.
    """
    accumulation = trainer.engine_config.gradient_accumulation_steps
    window_loss, window_steps = torch.zeros((), device=trainer.device), 0
    window_tokens, window_start = 0, time.perf_counter()
    metrics: dict = {}
    while trainer.step < settings.steps:
        micro_batches = [next(batches) for _ in range(accumulation)]
        loss, tokens = trainer.train_step(micro_batches)
        window_loss += loss
        window_steps += 1
        window_tokens += tokens
        step = trainer.step
        if settings.on_step is not None:
            settings.on_step(step, trainer.rank)
        at_eval = step % settings.eval_every == 0 or step == settings.steps
        at_checkpoint = step % settings.checkpoint_every == 0 or step == settings.steps
        if not (at_eval or at_checkpoint):
            continue
        mean_loss = window_loss.item() / window_steps  # waits for the device, then time the window
        elapsed = time.perf_counter() - window_start
        train_loss, tokens_per_second = trainer.all_reduce_mean([mean_loss, window_tokens / max(elapsed, 1e-9)])
        metrics = {
            "step": step,
            "train_loss": train_loss,
            "learning_rate": trainer.learning_rate,
            "tokens_per_second": tokens_per_second * trainer.world_size,
            **settings.extra_metrics,
            **trainer.loss_terms(),
        }
        if at_eval:
            metrics["replica_divergence"] = trainer.replica_divergence()
            for domain, rows in heldout.items():
                scores = trainer.evaluate(rows, settings.eval_batches, settings.eval_batch_size, settings.unigram_tokens.get(domain))
                for name, value in scores.items():
                    metrics[f"{domain}/{name}"] = value
            trainer.after_evaluation(metrics)
            trainer.history.append(metrics)
        directory = None
        if at_checkpoint:
            directory = checkpoint_dir()
            trainer.save_checkpoint(directory, data_position=step * accumulation)
            if step == settings.steps:
                trainer.export(Path(directory) / EXPORT_DIR, tokenizer)
        report(metrics, directory)
        window_loss, window_steps = torch.zeros((), device=trainer.device), 0
        window_tokens, window_start = 0, time.perf_counter()
    return metrics
