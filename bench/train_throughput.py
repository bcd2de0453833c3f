"""Training throughput: the DeepSpeed engine (without Ray, and through Ray Train) against a plain PyTorch
loop on the same model and the same batches, in one run. Prints tokens/s and the ratios.

CPU (this machine):
    python bench/train_throughput.py --preset tiny --model teacher --batch 16 --seq 64

GPU, the 2.3B teacher (no Ray there: --no-ray):
    python bench/train_throughput.py --preset paper --model teacher_2p3b --batch 32 --seq 128 \
        --precision bf16 autocast_bf16 --optimizer torch_fused_adamw --no-ray

Tokens are real (non-pad) tokens of random rows over the preset's vocabulary; each loop masks them with
the same collator, clips gradients at 1.0 and steps a warm-up/decay schedule, so the work is the same.
The plain loop applies the LM head to the masked positions only, as the engine does; the row
``plain_full_head`` is transformers' own ``labels=`` loss (the head on every position) for comparison.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_ray.config import EngineConfig, load_config  # noqa: E402
from transformers import get_linear_schedule_with_warmup  # noqa: E402

from atm_ray.train.engine import MlmTrainer, init_single_process_group, parameter_groups  # noqa: E402
from atm_ray.data.masking import MaskingCollator  # noqa: E402
from atm_ray.data.tokenizer import BOS_ID, SPECIAL_TOKENS  # noqa: E402
from atm_ray.train.modeling import build_masked_lm, count_parameters  # noqa: E402


def make_rows(count: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL_TOKENS), vocab, (count, seq), generator=generator)
    ids[:, 0] = BOS_ID
    return [{"input_ids": row.unsqueeze(0).numpy(), "noun_mask": torch.zeros(1, seq, dtype=torch.long).numpy()} for row in ids]


def batches(rows: list[dict], batch: int):
    import numpy as np

    index = 0
    while True:
        chunk = [rows[(index + offset) % len(rows)] for offset in range(batch)]
        index += batch
        yield {name: np.concatenate([row[name] for row in chunk]) for name in chunk[0]}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_rate(args, step) -> float:
    """Units per second of ``step()`` (which returns how many units it processed) over ``args.steps``
    calls after ``args.warmup`` untimed ones."""
    units, started = 0, 0.0
    for index in range(args.warmup + args.steps):
        if index == args.warmup:
            synchronize()
            units, started = 0, time.perf_counter()
        units += step()
    synchronize()
    return units / (time.perf_counter() - started)


def plain_pytorch(args, shape, vocab: int, precision: str, optimizer_name: str, full_head: bool = False) -> float:
    device = _device()
    with device:  # initialise on the GPU: a 2.3B model takes a minute to initialise on the CPU
        model = build_masked_lm(shape, vocab, seed=0).train()
    optimizer = torch.optim.AdamW(
        parameter_groups(model, 0.01), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=optimizer_name == "torch_fused_adamw"
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, 10, 10_000)
    collator = MaskingCollator(vocab, seed=0)
    autocast = precision in ("bf16", "autocast_bf16")
    stream = batches(make_rows(256, args.seq, vocab), args.batch)

    def step() -> int:
        batch = collator(next(stream))
        tokens = int(batch["attention_mask"].sum())  # on the CPU, as the engine counts
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if full_head:
                loss = model(**batch).loss
            else:
                hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                masked = batch["labels"] != -100
                loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[masked]), batch["labels"][masked])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens

    return timed_rate(args, step)


def engine_loop(args, shape, vocab: int, precision: str, optimizer_name: str, zero: int) -> float:
    engine_config = EngineConfig(
        zero_stage=zero,
        precision=precision,
        optimizer=optimizer_name,
        micro_batch_size=args.batch,
        learning_rate=1e-4,
        warmup_steps=10,
    )
    with _device():
        model = build_masked_lm(shape, vocab, seed=0)
    trainer = MlmTrainer(model, engine_config, total_steps=10_000, vocab_size=vocab)
    stream = batches(make_rows(256, args.seq, vocab), args.batch)
    rate = timed_rate(args, lambda: trainer.train_step([next(stream)])[1])
    trainer.engine.destroy()
    return rate


def _ray_worker(config: dict) -> None:
    import ray.train

    shape, args = config["shape"], argparse.Namespace(**config["args"])
    torch.set_num_threads(config["threads"])
    rate = engine_loop(args, shape, config["vocab"], config["precision"], config["optimizer"], config["zero"])
    # Ray Train V2 keeps metrics only with a checkpoint
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "rate.json").write_text(json.dumps(rate))
        ray.train.report({"tokens_per_second": rate}, checkpoint=ray.train.Checkpoint.from_directory(directory))


def ray_train_loop(args, shape, vocab: int, precision: str, optimizer_name: str, zero: int) -> float:
    import ray.train
    from ray.train.torch import TorchTrainer

    from atm_ray.cluster import init_ray

    init_ray()
    threads = torch.get_num_threads()
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={
            "shape": shape,
            "args": vars(args),
            "vocab": vocab,
            "precision": precision,
            "optimizer": optimizer_name,
            "zero": zero,
            "threads": threads,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=torch.cuda.is_available(), resources_per_worker={"CPU": min(threads, os.cpu_count() or 1)}
        ),
        run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="atm-ray-bench-")),
    )
    return trainer.fit().metrics["tokens_per_second"]


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(args, shape, vocab: int, key: tuple) -> float:
    loop, precision, zero = key
    if loop.startswith("plain"):
        rate = plain_pytorch(args, shape, vocab, precision, args.optimizer, full_head=loop == "plain_full_head")
    else:
        rate = engine_loop(args, shape, vocab, precision, args.optimizer, zero)
    _free()
    return rate


def measure_isolated(key: tuple) -> float:
    import subprocess

    single = [argument for argument in sys.argv[1:] if argument != "--isolate"]
    command = [sys.executable, __file__, *single, "--single", json.dumps(list(key)), "--rounds", "1", "--no-ray"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", default="teacher")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", nargs="+", default=["fp32"], help="engine precisions to try")
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--optimizer", default="torch_adamw", choices=["torch_adamw", "torch_fused_adamw"])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (best of each kept)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Train measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--isolate", action="store_true", help="each measurement in a fresh process (large models)")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    config = load_config(args.preset)
    shape = config.models[args.model].model_copy(update={"dropout": 0.0, "max_positions": max(args.seq, 8)})
    vocab = config.tokenizer.vocab_size
    if args.single:
        init_single_process_group()
        print(measure(args, shape, vocab, tuple(json.loads(args.single))))
        return
    count = count_parameters(shape, vocab)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.preset}/{args.model}: {count.non_embedding:,} non-embedding parameters, vocab {vocab:,}, "
          f"batch {args.batch} x seq {args.seq}, {args.steps} timed steps, on {device}", flush=True)
    init_single_process_group()

    baseline_precision = "bf16" if any(p in ("bf16", "autocast_bf16") for p in args.precision) else "fp32"
    # Interleave the loops over several rounds and keep each one's best: a shared machine is noisy.
    # With --isolate each measurement runs in its own process, so a 2.3B model's memory is freed.
    measurements = [("plain_pytorch", baseline_precision, None), ("plain_full_head", baseline_precision, None)]
    measurements += [("engine", precision, zero) for precision in args.precision for zero in args.zero]
    best: dict[tuple, float] = {}
    for round_index in range(args.rounds):
        for key in measurements:
            rate = measure_isolated(key) if args.isolate else measure(args, shape, vocab, key)
            best[key] = max(rate, best.get(key, 0.0))
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{key[0]} {key[1]} {key[2]}: {best[key]:,.0f}" for key in measurements), flush=True)
    if not args.no_ray:
        for precision in args.precision:
            for zero in args.zero:
                best[("ray_train", precision, zero)] = ray_train_loop(args, shape, vocab, precision, args.optimizer, zero)
    plain = best[("plain_pytorch", baseline_precision, None)]
    results = []
    for (loop, precision, zero), rate in best.items():
        label = f"{loop:15s} {precision:14s} {'' if zero is None else f'ZeRO-{zero}':7s}"
        print(f"{label} {rate:12,.0f} tokens/s  {rate / plain:6.3f} x plain PyTorch", flush=True)
        results.append({"loop": loop, "precision": precision, "zero": zero, "tokens_per_second": rate, "ratio": rate / plain})
    if args.json:
        args.json.write_text(json.dumps({"device": device, "results": results}, indent=2))


if __name__ == "__main__":
    main()
