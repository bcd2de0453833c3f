"""Tokenise + pack throughput on the full Stage-1 written corpus: one process against a multi-process
`datasets.map`, in one run. Prints MB/s (UTF-8 text in) and the ratio.

    python bench/prepare_throughput.py [--preset cpu] [--num-proc 2]

The tokenizer is trained once on a sample first; only tokenise + pack is timed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_ray.config import load_config  # noqa: E402
from atm_ray.data.prepare import read_corpus, tokenize_and_pack  # noqa: E402
from atm_ray.data.tokenizer import train_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config(args.preset, args.overrides)
    started = time.perf_counter()
    corpus, _ = read_corpus(config.data.written, config.data.root, strict=False, seed=config.seed)
    records = corpus["train"] + corpus["heldout"]
    megabytes = sum(len(record["text"].encode()) for record in records) / 1e6
    print(f"read {len(records):,} written texts ({megabytes:.1f} MB) in {time.perf_counter() - started:.1f} s", flush=True)
    sample = random.Random(0).sample([record["text"] for record in records], min(20_000, len(records)))
    tokenizer = train_tokenizer(sample, config.tokenizer.vocab_size)

    rates = {}
    for num_proc in (1, args.num_proc):
        started = time.perf_counter()
        table = tokenize_and_pack(records, tokenizer, config.data.max_seq_len, num_proc)
        elapsed = time.perf_counter() - started
        rates[num_proc] = megabytes / elapsed
        print(f"num_proc={num_proc}: {table.num_rows:,} rows of {config.data.max_seq_len} in {elapsed:.1f} s = {rates[num_proc]:.2f} MB/s", flush=True)
    print(f"multi-process / single-process: {rates[args.num_proc] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
