"""CPU inference backends for the joint intent + slot model, measured in one run on the same inputs and
threads: torch eager fp32; dynamic int8 (``quantize: int8``, the CPU default of ``atm-ray serve``);
torch.compile (inductor) of both; ONNX Runtime fp32 and dynamic int8 (the Parser's ``onnxruntime`` backend;
dynamic int8 is the CPU default of ``atm-ray serve`` and ``atm-ray predict``).

Speed: the raw forward at batch 1 (p50 / p99 over SNIPS test utterances, each padded to its own length) and
at batch 16, on the 17M-parameter model of the paper's final shape (random weights: speed does not depend
on them) or ``--model``. Parity: on a trained export (``--parity-model``, default the tiny run's fine-tuned
student), the share of SNIPS test utterances whose intent and every word's slot tag equal eager fp32's.

    python bench/cpu_backends.py [--threads 1] [--model EXPORT] [--parity-model EXPORT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_latency import build_model, percentiles  # noqa: E402

from atm_ray.data.files import resolve  # noqa: E402
from atm_ray.data.readers import read_nlu  # noqa: E402
from atm_ray.nlu.metrics import nlu_scores  # noqa: E402
from atm_ray.nlu.model import RobertaPreLayerNormForIntentAndSlots, encode_words, quantize_int8  # noqa: E402
from atm_ray.nlu.onnx_backend import Logits, OnnxJointModel  # noqa: E402


def torch_backend(model, compiled: bool):
    wrapped = Logits(model).eval()
    if compiled:
        wrapped = torch.compile(wrapped, dynamic=True)

    def run(inputs):
        with torch.inference_mode():
            intent, slots = wrapped(torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"]))
        return intent.numpy(), slots.numpy()

    return run


def onnx_backend(model, export: Path, quantize: str | None):
    """The Parser's own ONNX Runtime backend (export cached by weights, threads from torch's setting)."""
    session = OnnxJointModel(model, export, quantize).session

    def run(inputs):
        return tuple(session.run(None, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}))

    return run


def make_backends(export: Path) -> tuple[dict, dict]:
    """Every backend that builds here, and why the others did not."""
    load = lambda: RobertaPreLayerNormForIntentAndSlots.from_pretrained(str(export), dtype=torch.float32).eval()  # noqa: E731
    backends, failed = {}, {}
    builders = {
        "torch fp32": lambda: torch_backend(load(), compiled=False),
        "torch int8": lambda: torch_backend(quantize_int8(load()), compiled=False),
        "torch.compile fp32": lambda: torch_backend(load(), compiled=True),
        "torch.compile int8": lambda: torch_backend(quantize_int8(load()), compiled=True),
        "onnxruntime fp32": lambda: onnx_backend(load(), export, None),
        "onnxruntime int8 (default)": lambda: onnx_backend(load(), export, "int8"),
    }
    for name, build in builders.items():
        try:
            backends[name] = build()
        except Exception as error:  # a backend that does not build is a result, not a crash
            failed[name] = repr(error)[:300]
    return backends, failed


def encoded(export: Path, word_lists: list[list[str]], batch_size: int) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(export))
    config = json.loads((export / "config.json").read_text())
    max_len = config["max_position_embeddings"] - config["pad_token_id"] - 1
    return [encode_words(tokenizer, word_lists[start : start + batch_size], max_len, config.get("lowercase", False))
            for start in range(0, len(word_lists), batch_size)]


def speed(run, single: list[dict], batches: list[dict], rounds: int) -> dict:
    for inputs, _ in single[:30]:  # warm-up (and torch.compile's first compilations)
        run(inputs)
    for inputs, _ in batches[:3]:
        run(inputs)
    times = []
    for _ in range(rounds):
        for inputs, _ in single:
            started = time.perf_counter()
            run(inputs)
            times.append(time.perf_counter() - started)
    started, utterances = time.perf_counter(), 0
    for inputs, _ in batches:
        run(inputs)
        utterances += len(inputs["input_ids"])
    return {**percentiles(times), "batch16_utterances_per_s": utterances / (time.perf_counter() - started)}


def agreement(run, reference, single: list[dict], records: list[dict], config: dict) -> dict:
    """Share of utterances whose intent and every word's slot tag equal the reference backend's, and each
    backend's exact match against the gold labels, as fine-tuning scores it (words cut off by the length
    count as ``O``)."""
    same, predictions = 0, []
    for (inputs, positions), record in zip(single, records):
        (intent, slots), (ref_intent, ref_slots) = run(inputs), reference(inputs)
        words = [position for position in positions[0] if position >= 0]
        tags = slots[0, words, 1:].argmax(-1)
        same += int(intent[0, 1:].argmax() == ref_intent[0, 1:].argmax() and (tags == ref_slots[0, words, 1:].argmax(-1)).all())
        predictions.append({"intent": config["intent_labels"][1 + intent[0, 1:].argmax()],
                            "slot_tags": [config["slot_labels"][1 + tag] for tag in tags] + ["O"] * (len(record["slot_tags"]) - len(words))})
    return {"same_parse_as_fp32": same / len(single), "exact_match": nlu_scores(records, predictions)["exact_match"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a fine-tuned export (default: the paper's final shape, random weights)")
    parser.add_argument("--parity-model", type=Path, default=Path("runs/tiny/finetune_student/export"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--utterances", type=int, default=200, help="SNIPS test utterances timed at batch 1")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records, _ = read_nlu("jointbert", resolve("bundled:nlu/snips/test"))
    word_lists = [record["tokens"] for record in records]
    results: dict = {"threads": args.threads, "torch": torch.__version__, "speed": {}, "parity": {}, "failed": {}}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model = args.model or build_model(work / "paper-final")
        single = encoded(model, word_lists[: args.utterances], 1)
        batches = encoded(model, word_lists, 16)
        backends, results["failed"] = make_backends(model)
        for name, run in backends.items():
            results["speed"][name] = speed(run, [(inputs, positions) for inputs, positions in single], batches, rounds=1)
            print(f"{name}: {json.dumps(results['speed'][name])}", flush=True)
        if args.parity_model and (args.parity_model / "config.json").is_file():
            trained, _ = make_backends(args.parity_model)
            parity_inputs = encoded(args.parity_model, word_lists, 1)
            reference = trained["torch fp32"]
            trained_config = json.loads((args.parity_model / "config.json").read_text())
            for name, run in trained.items():
                results["parity"][name] = agreement(run, reference, parity_inputs, records, trained_config)
    print(f"\nCPU backends, {args.threads} thread(s), torch {torch.__version__}; model: {args.model or 'paper final shape (17M), random weights'}")
    print(f"| backend | batch-1 p50 ms | p99 ms | batch-16 utt/s | same parse as fp32 | exact match |  "
          f"(last two: {args.parity_model}, SNIPS test, {len(records)} utterances)")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in results["speed"].items():
        parity = results["parity"].get(name)
        same = '–' if parity is None else f"{100 * parity['same_parse_as_fp32']:.1f}%"
        exact = '–' if parity is None else f"{100 * parity['exact_match']:.2f}"
        print(f"| {name} | {values['p50_ms']:.2f} | {values['p99_ms']:.2f} | {values['batch16_utterances_per_s']:.0f} | {same} | {exact} |")
    for name, reason in results["failed"].items():
        print(f"| {name} | did not build: {reason} | | | | |")
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
