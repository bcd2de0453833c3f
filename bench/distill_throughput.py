"""Distillation throughput: samples/s of the engine's distillation step (DistillTrainer, no Ray) against a
plain PyTorch loop with the same teacher, student, losses and batches, in one run, best of interleaved rounds.

CPU (this machine):
    python bench/distill_throughput.py --preset tiny --teacher teacher --student intermediate --batch 16 --seq 64

GPU (the issue's shapes; no Ray there):
    python bench/distill_throughput.py --preset paper --teacher teacher_2p3b --student intermediate --batch 64 --seq 128 \
        --precision autocast_bf16 --optimizer torch_fused_adamw
    python bench/distill_throughput.py --preset paper --teacher intermediate --student final --batch 256 --seq 128 \
        --precision autocast_bf16 --optimizer torch_fused_adamw

The loss follows the preset's distill.<student> weights (the final student adds hidden-state matching).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_ray.config import load_config  # noqa: E402
from atm_ray.train.distill import DistillTrainer, StudentWithProjection  # noqa: E402
from transformers import get_linear_schedule_with_warmup  # noqa: E402

from atm_ray.train.engine import init_single_process_group, parameter_groups  # noqa: E402
from atm_ray.train.losses import hidden_state_mse, mlm_loss, soft_cross_entropy, uniform_layer_map  # noqa: E402
from atm_ray.data.masking import MaskingCollator  # noqa: E402
from atm_ray.train.modeling import build_masked_lm  # noqa: E402
from train_throughput import _device, _free, batches, make_rows, timed_rate  # noqa: E402


def measure(args, step, label: str) -> float:
    """Samples/s of ``step``; with ``--profile``, also the GPU kernels of a few more steps."""
    rate = timed_rate(args, step)
    if args.profile and torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(f"--- {label}: 3 steps", flush=True)
        print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60), flush=True)
    return rate


def plain_pytorch(args, settings, teacher_dir: str, student_shape, vocab: int) -> float:
    device = _device()
    from transformers import AutoModelForMaskedLM

    teacher = AutoModelForMaskedLM.from_pretrained(teacher_dir).to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        teacher = teacher.to(torch.bfloat16)
    with device:
        student = build_masked_lm(student_shape, vocab, seed=0)
    hidden = settings.weights.hidden > 0
    model = StudentWithProjection(student, teacher.config.hidden_size if hidden else None).to(device).train()
    layer_map = uniform_layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers) if hidden else None
    optimizer = torch.optim.AdamW(
        parameter_groups(model, 0.01), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=args.optimizer == "torch_fused_adamw"
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, 10, 10_000)
    collator = MaskingCollator(vocab, seed=0)
    autocast = args.precision in ("bf16", "autocast_bf16")
    stream = batches(make_rows(256, args.seq, vocab), args.batch)

    def step() -> int:
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in collator(next(stream)).items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                teacher_out = teacher(**inputs, output_hidden_states=hidden)
            student_out = model(**inputs, output_hidden_states=hidden)
            masked = batch["labels"] != -100
            loss = settings.weights.mlm * mlm_loss(student_out.logits, batch["labels"])
            loss = loss + settings.weights.soft_ce * soft_cross_entropy(
                student_out.logits, teacher_out.logits, masked, settings.temperature
            )
            if hidden:
                loss = loss + settings.weights.hidden * hidden_state_mse(
                    student_out.hidden_states, teacher_out.hidden_states, model.projection, layer_map, batch["attention_mask"]
                )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return args.batch

    return measure(args, step, "plain PyTorch")


def engine_loop(args, settings, teacher_dir: str, student_shape, vocab: int) -> float:
    with _device():
        student = build_masked_lm(student_shape, vocab, seed=0)
    trainer = DistillTrainer(student, settings, [teacher_dir], vocab)
    stream = batches(make_rows(256, args.seq, vocab), args.batch)

    def step() -> int:
        trainer.train_step([next(stream)])
        return args.batch

    rate = measure(args, step, "engine")
    trainer.engine.destroy()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--teacher", default="teacher")
    parser.add_argument("--student", default="intermediate", choices=["intermediate", "final"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "autocast_bf16"])
    parser.add_argument("--optimizer", default="torch_adamw", choices=["torch_adamw", "torch_fused_adamw"])
    parser.add_argument("--profile", action="store_true", help="print the GPU kernels of 3 steps of each loop")
    args = parser.parse_args()

    config = load_config(args.preset)
    vocab = config.tokenizer.vocab_size
    stage = getattr(config.distill, args.student)
    settings = stage.model_copy(
        update={
            "engine": stage.engine.model_copy(
                update={"zero_stage": 0, "precision": args.precision, "optimizer": args.optimizer, "micro_batch_size": args.batch}
            )
        }
    )
    shape = lambda name: config.models[name].model_copy(update={"dropout": 0.0, "max_positions": max(args.seq, 8)})  # noqa: E731
    init_single_process_group()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.preset}: {args.teacher} -> {stage.student}, batch {args.batch} x "
          f"seq {args.seq}, weights {settings.weights}, on {device}", flush=True)
    with tempfile.TemporaryDirectory() as teacher_dir:
        with _device():
            build_masked_lm(shape(args.teacher), vocab, seed=1).save_pretrained(teacher_dir)
        best = {"plain_pytorch": 0.0, "engine": 0.0}
        for round_index in range(args.rounds):
            best["plain_pytorch"] = max(best["plain_pytorch"], plain_pytorch(args, settings, teacher_dir, shape(stage.student), vocab))
            _free()
            best["engine"] = max(best["engine"], engine_loop(args, settings, teacher_dir, shape(stage.student), vocab))
            _free()
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{k} {v:,.1f}" for k, v in best.items()), flush=True)
    plain = best["plain_pytorch"]
    for loop, rate in best.items():
        print(f"{loop:14s} {rate:10,.1f} samples/s  {rate / plain:6.3f} x plain PyTorch", flush=True)


if __name__ == "__main__":
    main()
