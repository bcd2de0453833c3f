"""The DeepSpeed engine loop without Ray (real DeepSpeed, CPU, gloo, one process)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import clean_environment
from transformers import AutoModelForMaskedLM

from atm_ray.config import EngineConfig, load_config
from atm_ray.train.faults import FAULT_EXIT_CODE
from atm_ray.train.engine import (
    MlmTrainer, RowSource, deepspeed_config, endless, init_single_process_group, read_rows, split_batch_size,
)
from atm_ray.train.modeling import build_masked_lm
from atm_ray.train.stages import run_pretrain_stage

SHORT_RUN = [
    "pretrain.stage1.steps=12",
    "pretrain.stage1.eval_every=4",
    "pretrain.stage1.checkpoint_every=4",
    "pretrain.stage1.engine.micro_batch_size=8",
    "pretrain.stage1.engine.warmup_steps=2",
]
# Recorded on this CPU with seed 0 (fp32, ZeRO-0; tiny recipe, transformers' linear warm-up schedule; decontaminated data, 2026-11-28):
# train loss at steps 4, 8, 12.
RECORDED_LOSSES = [6.8700, 6.6396, 6.4294]


def _short_config(tmp_path, run_name, *overrides):
    config = load_config("tiny", [f"run_dir={tmp_path / run_name}", *SHORT_RUN, *overrides])
    return config


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    """A run folder whose prepare stage is done, shared by the runs of this module."""
    from atm_ray.data.prepare import prepare

    root = tmp_path_factory.mktemp("engine")
    prepare(load_config("tiny", [f"run_dir={root / 'prepared'}"]))
    return root


def _run(prepared_run, name, *overrides):
    import shutil

    run_dir = prepared_run / name
    if not (run_dir / "prepare").exists():
        shutil.copytree(prepared_run / "prepared" / "prepare", run_dir / "prepare")
    config = load_config("tiny", [f"run_dir={run_dir}", *SHORT_RUN, *overrides])
    result = run_pretrain_stage(config, 1, use_ray=False)
    return json.loads((result.stage_dir / "metrics.json").read_text()), result


def test_loss_regression_against_recorded_values(prepared_run):
    history, result = _run(prepared_run, "regression")
    losses = [entry["train_loss"] for entry in history]
    assert [entry["step"] for entry in history] == [4, 8, 12]
    assert losses == pytest.approx(RECORDED_LOSSES, rel=0.005)
    assert history[-1]["written/perplexity"] == pytest.approx(np.exp(history[-1]["written/mlm_loss"]))
    assert 0 <= history[-1]["spoken/noun_mask_fill_accuracy"] <= 1


def test_zero1_and_zero2_give_the_same_losses(prepared_run):
    zero1, _ = _run(prepared_run, "zero1", "pretrain.stage1.engine.zero_stage=1")
    zero2, _ = _run(prepared_run, "zero2", "pretrain.stage1.engine.zero_stage=2")
    assert [entry["train_loss"] for entry in zero1] == pytest.approx([entry["train_loss"] for entry in zero2], rel=1e-5)
    assert zero1[-1]["written/mlm_loss"] == pytest.approx(zero2[-1]["written/mlm_loss"], rel=1e-5)


def test_bf16_engine_trains(prepared_run):
    history, _ = _run(prepared_run, "bf16", "pretrain.stage1.engine.precision=bf16")
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[0]["train_loss"] == pytest.approx(RECORDED_LOSSES[0], rel=0.05)


def test_killed_run_resumes_and_matches_uninterrupted(prepared_run):
    uninterrupted, _ = _run(prepared_run, "uninterrupted")
    run_dir = prepared_run / "killed"
    import shutil

    shutil.copytree(prepared_run / "prepared" / "prepare", run_dir / "prepare")
    command = [sys.executable, "-m", "atm_ray.cli", "pretrain", "--stage", "1", "--no-ray", "--run-dir", str(run_dir), *SHORT_RUN]
    # a fresh process group: without the rendezvous variables this test process set for itself
    environment = clean_environment()
    environment["ATM_RAY_FAIL_AT_STEP"] = "10"
    crashed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == FAULT_EXIT_CODE, crashed.stderr[-3000:]
    (keyed,) = (run_dir / "teacher_stage1" / "checkpoints").iterdir()  # one folder per config hash
    checkpoints = sorted(path.name for path in keyed.iterdir())
    assert checkpoints == ["step-4", "step-8"]
    resumed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    history = json.loads((run_dir / "teacher_stage1" / "metrics.json").read_text())
    assert [entry["step"] for entry in history] == [4, 8, 12]
    assert [entry["train_loss"] for entry in history] == pytest.approx([entry["train_loss"] for entry in uninterrupted], rel=1e-6)
    assert history[-1]["written/mlm_loss"] == pytest.approx(uninterrupted[-1]["written/mlm_loss"], rel=1e-6)


def test_export_loads_and_gives_the_engines_logits(prepared_run, tmp_path):
    from atm_ray.data.prepare import PreparedData
    from atm_ray.data.tokenizer import load_tokenizer

    prepared = PreparedData(prepared_run / "prepared" / "prepare")
    config = load_config("tiny")
    init_single_process_group()
    engine_config = EngineConfig(micro_batch_size=4, warmup_steps=1)
    model = build_masked_lm(config.models["teacher"], prepared.vocab_size, seed=0)
    trainer = MlmTrainer(model, engine_config, total_steps=3, vocab_size=prepared.vocab_size)
    batches = endless(RowSource(read_rows(prepared.shard_dir("written", "train")), 4, seed=0))
    for _ in range(3):
        trainer.train_step([next(batches)])
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    trainer.export(tmp_path / "export", tokenizer)
    assert (tmp_path / "export" / "model.safetensors").is_file()
    loaded = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "export")).eval()
    inputs = tokenizer(["set an alarm for <mask> am"], return_tensors="pt")
    trainer.engine.eval()
    with torch.no_grad():
        expected = trainer.engine(**inputs).logits
        actual = loaded(**inputs).logits
    assert torch.allclose(expected, actual, atol=1e-5)


def test_training_loss_and_gradients_match_transformers_labels_path(prepared_run):
    """The head runs on the masked positions only: the loss and every gradient are those of the model's own
    ``labels=`` forward (all positions), and the encoder hook leaves evaluation's full logits alone."""
    from deepspeed.utils import safe_get_full_grad

    from atm_ray.data.prepare import PreparedData

    prepared = PreparedData(prepared_run / "prepared" / "prepare")
    init_single_process_group()
    model = build_masked_lm(load_config("tiny").models["teacher"], prepared.vocab_size, seed=0)
    reference = build_masked_lm(load_config("tiny").models["teacher"], prepared.vocab_size, seed=0)
    trainer = MlmTrainer(model, EngineConfig(micro_batch_size=8, warmup_steps=1), total_steps=3, vocab_size=prepared.vocab_size)
    rows = next(endless(RowSource(read_rows(prepared.shard_dir("spoken", "train")), 8, seed=0)))
    batch = trainer.collator(rows)
    masked = int((batch["labels"] != -100).sum())
    assert 0 < masked < batch["labels"].numel()

    head_rows = []
    model.lm_head.register_forward_hook(lambda module, args, output: head_rows.append(args[0].shape[:-1]))
    loss = trainer.compute_loss(batch)
    trainer.engine.backward(loss)
    assert head_rows == [(masked,)]  # the head saw the masked positions alone
    expected = reference(**batch).loss
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for (name, parameter), (_, reference_parameter) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(safe_get_full_grad(parameter), reference_parameter.grad, atol=1e-6), name

    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (*batch["input_ids"].shape, prepared.vocab_size) and head_rows[-1] == batch["input_ids"].shape


def test_deepspeed_config_and_schedule():
    engine = EngineConfig(zero_stage=2, precision="bf16", micro_batch_size=4, gradient_accumulation_steps=3)
    config = deepspeed_config(engine, world_size=2)
    assert config["train_batch_size"] == 24 and config["zero_optimization"]["stage"] == 2
    assert config["bf16"] == {"enabled": True} and "optimizer" not in config
    assert deepspeed_config(EngineConfig(precision="autocast_bf16"), 1)["torch_autocast"]["dtype"] == "bfloat16"
    assert deepspeed_config(EngineConfig(optimizer="fused_adam"), 1)["optimizer"]["type"] == "AdamW"


def test_engine_learning_rate_follows_linear_warmup_then_decay(prepared_run):
    """The engine steps transformers' linear schedule: up over the warm-up, down to zero at the end."""
    from atm_ray.data.prepare import PreparedData

    prepared = PreparedData(prepared_run / "prepared" / "prepare")
    init_single_process_group()
    engine_config = EngineConfig(micro_batch_size=4, warmup_steps=10, learning_rate=1e-3)
    model = build_masked_lm(load_config("tiny").models["final"], prepared.vocab_size, seed=0)
    trainer = MlmTrainer(model, engine_config, total_steps=110, vocab_size=prepared.vocab_size)
    rates = []
    for _ in range(111):
        rates.append(trainer.learning_rate)
        trainer.scheduler.step()
    assert rates[0] < rates[5] < rates[9] < rates[10] == pytest.approx(1e-3)
    assert rates[60] == pytest.approx(0.5e-3) and rates[110] == 0.0


def test_replay_batch_split():
    assert split_batch_size(16, 0.25) == (12, 4)
    assert split_batch_size(16, 0.0) == (16, 0)
    assert split_batch_size(4, 0.05) == (3, 1)
    with pytest.raises(ValueError, match="leaves no room"):
        split_batch_size(2, 0.9)


def test_row_source_splits_ranks_without_overlap():
    columns = {"input_ids": np.arange(40).reshape(20, 2), "noun_mask": np.zeros((20, 2))}
    rank0 = [row for batch in RowSource(columns, 5, 0, 2, seed=1).epoch(0) for row in batch["input_ids"][:, 0]]
    rank1 = [row for batch in RowSource(columns, 5, 1, 2, seed=1).epoch(0) for row in batch["input_ids"][:, 0]]
    assert len(rank0) == len(rank1) == 10 and not set(rank0) & set(rank1)
    with pytest.raises(ValueError, match="cannot give each of 2 ranks a batch of 11"):
        RowSource(columns, 11, 0, 2)


def _heldout_loss(model, rows, batches: int, batch_size: int = 32) -> float:
    """The engine's held-out masked-token loss, recomputed on a loaded model with the same fixed masks."""
    from atm_ray.data.masking import IGNORE_INDEX, MaskingCollator

    collator = MaskingCollator(model.config.vocab_size, 0.15, "eval", seed=0 + 12345)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, batches * batch_size, batch_size):
            batch = collator({name: column[start : start + batch_size] for name, column in rows.items()})
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            chosen = batch["labels"] != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[chosen], batch["labels"][chosen], reduction="sum").item()
            count += int(chosen.sum())
    return total / count


def test_zero3_with_gradient_accumulation_exports_the_trained_weights(prepared_run):
    history, result = _run(
        prepared_run, "zero3", "pretrain.stage1.engine.zero_stage=3", "pretrain.stage1.engine.gradient_accumulation_steps=2"
    )
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    model = AutoModelForMaskedLM.from_pretrained(str(result.export_dir)).eval()
    rows = read_rows(prepared_run / "zero3" / "prepare" / "shards" / "written" / "heldout")
    batches = load_config("tiny").pretrain.stage1.eval_batches
    # the gathered ZeRO-3 export scores the held-out set exactly as the engine did at the last step
    assert _heldout_loss(model, rows, batches) == pytest.approx(history[-1]["written/mlm_loss"], rel=1e-4)


def test_a_stale_op_build_lock_from_a_killed_run_does_not_hang_the_next(tmp_path):
    """Ctrl-C during DeepSpeed's first op build (a run of several workers) leaves torch's bare `lock` file
    behind; the next build used to wait on it forever. The cached build is copied where it exists (else
    the op builds here)."""
    import shutil

    from torch.utils.cpp_extension import get_default_build_root

    extensions = tmp_path / "torch_extensions"
    extensions.mkdir()
    for cached in Path(get_default_build_root()).glob("py*_cpu/deepspeed_shm_comm"):
        shutil.copytree(cached, extensions / cached.name, ignore=shutil.ignore_patterns("lock"))
    (extensions / "deepspeed_shm_comm").mkdir(exist_ok=True)
    stale = extensions / "deepspeed_shm_comm" / "lock"
    stale.touch()
    code = "from atm_ray.train.engine import build_deepspeed_ops; build_deepspeed_ops(world_size=2)"
    finished = subprocess.run([sys.executable, "-c", code], env=clean_environment(TORCH_EXTENSIONS_DIR=str(extensions)),
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert not stale.exists() and (extensions / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file()


def test_a_single_process_stage_builds_no_deepspeed_op(prepared_run, tmp_path):
    """One process has no peer to all-reduce with through shared memory: DeepSpeed's shm op is not
    compiled for it (it cost the first stage of every fresh install ~2 minutes on 2 cores)."""
    import shutil

    extensions = tmp_path / "torch_extensions"  # empty: as on a fresh machine
    extensions.mkdir()
    run_dir = tmp_path / "run"
    shutil.copytree(prepared_run / "prepared" / "prepare", run_dir / "prepare")
    command = [sys.executable, "-m", "atm_ray.cli", "pretrain", "--stage", "1", "--no-ray", "--run-dir", str(run_dir),
               *SHORT_RUN, "pretrain.stage1.steps=4"]
    finished = subprocess.run(command, env=clean_environment(TORCH_EXTENSIONS_DIR=str(extensions)),
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "teacher_stage1 finished" in finished.stdout + finished.stderr
    assert not list(extensions.rglob("*.so")), list(extensions.rglob("*"))
