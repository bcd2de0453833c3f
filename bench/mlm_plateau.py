"""How fast does a small masked LM leave the unigram plateau? A grid of recipes, each a plain PyTorch loop
(the engine's masking, model class and held-out metrics; no DeepSpeed, no Ray) on a prepared run's shards.

    atm-ray prepare --preset tiny --run-dir runs/plateau_v1000 tokenizer.vocab_size=1000
    python bench/mlm_plateau.py --prepared runs/plateau_v1000/prepare --train spoken \\
        --grid '[{"layers": 4, "hidden": 128, "lr": 2e-3}, {"layers": 2, "hidden": 64, "lr": 4e-3}]' --steps 2000

Each row: the held-out mask-filling accuracy on written and spoken text at every evaluation, the accuracy
of always guessing the most frequent training token on the same masks, the first step at 2x and 3x that
baseline, and seconds per step on this machine. ``--jobs N`` runs N recipes at once (a GPU takes many).
Results go to ``--jsonl`` (one line per recipe, as each ends) for the README's record of what was tried.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import get_linear_schedule_with_warmup  # noqa: E402

from atm_ray.config import ModelShape  # noqa: E402
from atm_ray.train.engine import RowSource, endless, masked_lm_metrics, parameter_groups, read_rows  # noqa: E402
from atm_ray.data.masking import MaskingCollator, most_frequent_token  # noqa: E402
from atm_ray.train.modeling import build_masked_lm  # noqa: E402

DEFAULTS = {"layers": 4, "hidden": 128, "heads": 4, "lr": 2e-3, "warmup": 50, "batch": 32, "dropout": 0.0,
            "weight_decay": 0.01, "train": None}


def run_recipe(arguments: tuple[dict, dict]) -> dict:
    recipe, options = arguments
    recipe = {**DEFAULTS, **recipe}
    device = torch.device(options["device"])
    torch.set_num_threads(options["threads"])
    prepared = Path(options["prepared"])
    manifest = json.loads((prepared / "manifest.json").read_text())
    vocab_size = manifest["vocab_size"]
    train_kind = recipe["train"] or options["train"]
    train = read_rows(prepared / "shards" / train_kind / "train")
    heldout = {kind: {name: column[: options["eval_rows"]] for name, column in read_rows(prepared / "shards" / kind / "heldout").items()}
               for kind in ("written", "spoken")}
    unigram = {kind: most_frequent_token(read_rows(prepared / "shards" / kind / "train")["input_ids"]) for kind in heldout}
    shape = ModelShape(num_layers=recipe["layers"], hidden_size=recipe["hidden"], num_heads=recipe["heads"],
                       intermediate_size=4 * recipe["hidden"], max_positions=manifest["seq_len"], dropout=recipe["dropout"])
    model = build_masked_lm(shape, vocab_size, seed=options["seed"]).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe["weight_decay"]), lr=recipe["lr"], betas=(0.9, 0.98), eps=1e-6)
    schedule = get_linear_schedule_with_warmup(optimizer, recipe["warmup"], options["steps"])
    collator = MaskingCollator(vocab_size, 0.15, "random", seed=options["seed"])
    batches = endless(RowSource(train, recipe["batch"], seed=options["seed"]))
    curve, started, first = [], time.perf_counter(), {}
    for step in range(1, options["steps"] + 1):
        model.train()
        batch = {name: tensor.to(device) for name, tensor in collator(next(batches)).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % options["eval_every"] == 0 or step == options["steps"]:
            model.eval()
            point = {"step": step, "train_loss": loss.item()}
            for kind, rows in heldout.items():
                metrics = masked_lm_metrics(model, rows, math.ceil(options["eval_rows"] / 32), 32, vocab_size, 0.15,
                                            options["seed"], device, unigram_token=unigram[kind])
                point[f"{kind}/mask_fill_accuracy"] = metrics["mask_fill_accuracy"]
                point[f"{kind}/unigram_mask_fill_accuracy"] = metrics["unigram_mask_fill_accuracy"]
                for factor in (2, 3):
                    if metrics["mask_fill_accuracy"] >= factor * metrics["unigram_mask_fill_accuracy"]:
                        first.setdefault(f"{kind}/{factor}x_step", step)
            curve.append(point)
    seconds = time.perf_counter() - started
    return {"recipe": recipe, "train": train_kind, "vocab_size": vocab_size, "seq_len": manifest["seq_len"],
            "steps": options["steps"], "seconds": seconds, "seconds_per_step": seconds / options["steps"],
            "first_step": first, "final": curve[-1], "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", action="append", required=True, help="a prepare/ folder (repeatable: a grid over them)")
    parser.add_argument("--train", default="spoken", choices=("written", "spoken"))
    parser.add_argument("--grid", default="[{}]", help="JSON list of recipes (keys: " + ", ".join(DEFAULTS) + ")")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--jsonl", type=Path)
    args = parser.parse_args()
    work = [(recipe, {**vars(args), "prepared": prepared, "jsonl": None}) for prepared in args.prepared for recipe in json.loads(args.grid)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.jobs) as pool:
        for result in pool.imap(run_recipe, work):
            final = result["final"]
            print(f"{json.dumps(result['recipe'])} vocab {result['vocab_size']} seq {result['seq_len']} on {result['train']}: "
                  f"spoken {final['spoken/mask_fill_accuracy']:.3f} (unigram {final['spoken/unigram_mask_fill_accuracy']:.3f}), "
                  f"written {final['written/mask_fill_accuracy']:.3f} (unigram {final['written/unigram_mask_fill_accuracy']:.3f}); "
                  f"first {result['first_step']}; {1000 * result['seconds_per_step']:.1f} ms/step", flush=True)
            if args.jsonl:
                with args.jsonl.open("a") as handle:
                    handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
