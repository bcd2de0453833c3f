"""Batch prediction throughput, in one run: the in-process ``Parser`` on the whole file (the reference),
``atm-ray predict`` in this process, and ``atm-ray predict`` through Ray Data's actor pool (2 actors x 1
thread on this 2-core machine), on the same file of SNIPS test utterances.

    python bench/predict_throughput.py --model runs/tiny/finetune_student/export [--utterances 20000]

Prints utterances/s of each and the ratio to the reference (the cost of reading, writing and, under Ray,
of the actor pool: start-up, serialisation).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_ray.data.files import resolve  # noqa: E402
from atm_ray.data.readers import read_nlu  # noqa: E402
from atm_ray.nlu.model import Parser  # noqa: E402
from atm_ray.nlu.predict import predict_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--utterances", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    records, _ = read_nlu("jointbert", resolve("bundled:nlu/snips/test"))
    texts = [" ".join(records[index % len(records)]["tokens"]) for index in range(args.utterances)]
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "utterances.txt"
        source.write_text("".join(text + "\n" for text in texts))
        import torch

        torch.set_num_threads(1)
        reference = Parser(args.model, quantize="int8", backend="onnxruntime")  # what predict_file runs
        started = time.perf_counter()
        for start in range(0, len(texts), args.batch_size):
            reference.parse(texts[start : start + args.batch_size])
        rates = {"Parser in process, 1 thread (reference)": len(texts) / (time.perf_counter() - started)}
        here = predict_file(args.model, source, Path(scratch) / "here.jsonl", use_ray=False, batch_size=args.batch_size)
        rates["atm-ray predict, this process"] = here.utterances_per_second
        torch.set_num_threads(2)
        started = time.perf_counter()
        with_ray = predict_file(args.model, source, Path(scratch) / "ray.jsonl", use_ray=True, actors=2, batch_size=args.batch_size)
        rates["atm-ray predict, Ray Data 2 actors x 1 thread"] = with_ray.utterances_per_second
        rates["  the same, with Ray start-up and file I/O (wall)"] = len(texts) / (time.perf_counter() - started)
    reference_rate = next(iter(rates.values()))
    print(f"\n{args.utterances} utterances, model {args.model}, batches of {args.batch_size}, int8:")
    for name, rate in rates.items():
        print(f"  {name:52s} {rate:8.0f} utt/s  ({rate / reference_rate:.2f}x the reference)")


if __name__ == "__main__":
    main()
