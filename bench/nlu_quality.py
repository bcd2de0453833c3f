"""NLU quality and what each step of the recipe buys (the paper's ablation): fine-tune every model of a
finished pipeline run the same way on SNIPS and on SLURP devel, over several fine-tuning seeds, and print
intent accuracy, slot F1 and exact match (mean ± std over seeds) with the relative error change against
the scratch baseline, beside the JointBERT anchors.

    atm-ray pipeline --preset tiny && python bench/nlu_quality.py --preset tiny --no-ray
    python bench/nlu_quality.py --preset cpu --seeds 0 1 2          # after `atm-ray pipeline --preset cpu`
    python bench/nlu_quality.py --preset cpu --no-ray --jobs 2      # two fine-tunings at once, 1 thread each (~1.2× sooner on 2 cores)
    python bench/nlu_quality.py --preset cpu --no-ray --datasets slurp_devel --folds 10 --seeds 0   # every tenth of SLURP devel tested once
    python bench/nlu_quality.py --preset cpu --teacher mine=/path/to/bert   # one more row: a student of your teacher

Rows (same fine-tuning for every row):
- scratch: the final student's architecture from random weights;
- mlm_only: the final student's architecture pretrained with MLM alone on the final distillation's text for
  the same steps (no teacher; trained here as the stage ``final_mlm_only`` if the run lacks it);
- final: the distilled final student; intermediate: the intermediate student after its continuation;
- teacher_stage1 / teacher_stage2: the teachers themselves;
- final_from_NAME (``--teacher NAME=DIR``): the final student distilled from a teacher you have (the README's
  "Bringing your own teacher": ``teachers.stage1=DIR``, same preset and steps, in the run folder
  ``<run>/from_NAME``). It has the teacher's vocabulary, so its embedding tables differ from the other rows'.

A difference counts as a gain only when it exceeds twice the larger of the two rows' standard deviations
over seeds; the table says which do. Data come from the preset's data.root (../shared/data); where a
corpus is not there, the slice bundled in the package is used and the table says so. SLURP devel has no
train/test split: 10% of it is held out for dev and 10% for test; ``--folds K`` tests K disjoint tenths in
turn (cross-validation: K times the test utterances, so a row's score moves less with which 203 utterances
happen to be held out; fold 0 is the default split). Results go to
<run>/nlu_quality.{md,json}; the run report (``atm-ray report``) includes the markdown.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_ray.config import NluSource, load_config  # noqa: E402
from atm_ray.data import files  # noqa: E402
from atm_ray.train.engine import EXPORT_DIR  # noqa: E402
from atm_ray.nlu.evaluate import score_model  # noqa: E402
from atm_ray.nlu.finetune import NluData, load_nlu_data, plan_finetune, run_finetune_stage, split_sources  # noqa: E402
from atm_ray.train.modeling import count_parameters  # noqa: E402
from atm_ray.train.stage_table import (  # noqa: E402
    FINAL_DISTILL, INTERMEDIATE_CONTINUE, MASKED_LM_STAGES, STAGES, TEACHER_STAGE1, TEACHER_STAGE2,
)
from atm_ray.train.stages import run_stages  # noqa: E402
from atm_ray.utils import atomic_write_json, atomic_write_text  # noqa: E402

DATASETS = {
    "snips": ("jointbert", "nlu/snips", "bundled:nlu/snips"),
    "slurp_devel": ("slurp", "nlu/slurp/devel.jsonl", "bundled:nlu/slurp/devel.jsonl"),
}
MODELS = {  # row -> the stage whose export is fine-tuned
    "scratch": FINAL_DISTILL,
    "mlm_only": "final_mlm_only",
    "final": FINAL_DISTILL,
    "intermediate": INTERMEDIATE_CONTINUE,
    "teacher_stage1": TEACHER_STAGE1,
    "teacher_stage2": TEACHER_STAGE2,
}
METRICS = ("intent_accuracy", "slot_f1", "exact_match")
ANCHORS = """JointBERT anchors (SNIPS test, full training set): BERT-base 99.14 intent / 96.90 slot F1 / 93.00 exact match;
DistilBERT 98.00 / 96.10 / 91.00."""


def train_mlm_only(config, run_dir: Path, use_ray: bool) -> Path:
    """The final student's shape trained with MLM alone on the final distillation's text and steps."""
    from atm_ray.data.prepare import prepare
    from atm_ray.train.stages import make_plan, run_stage, run_stage_local

    prepared = prepare(config, run_dir)
    # the final distillation's row without its teacher: same shape, text, steps and settings, MLM only
    mlm_only = replace(STAGES[FINAL_DISTILL], name="final_mlm_only", objective="mlm", teachers=())
    plan = make_plan(config, prepared, run_dir, mlm_only)
    return (run_stage if use_ray else run_stage_local)(config, plan, prepared).export_dir


def non_embedding_parameters(export_dir: Path) -> int:
    from atm_ray.config import ModelShape

    model = json.loads((export_dir / "config.json").read_text())
    shape = ModelShape(num_layers=model["num_hidden_layers"], hidden_size=model["hidden_size"],
                       num_heads=model["num_attention_heads"], intermediate_size=model["intermediate_size"],
                       max_positions=model["max_position_embeddings"] - 2, dropout=0.0)
    return count_parameters(shape, model["vocab_size"]).non_embedding


def fine_tune_and_score(config, data, directory: Path, name: str, scratch: bool, run_dir: Path, use_ray: bool,
                        threads: int | None = None) -> dict:
    """One row's fine-tuning for one seed (skipped when up to date), scored on the test split."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    plan = plan_finetune(config, data, directory, name, scratch, run_dir)
    manifest = run_finetune_stage(config, plan, data, use_ray=use_ray)
    return score_model(manifest["outputs"]["export"], data.test)


def folds(data: NluData, count: int) -> list[NluData]:
    """``count`` disjoint test splits of a dataset cut from one file (cross-validation): fold k tests on the
    k-th block of the records in the order ``load_nlu_data`` shuffled them, the dev block follows it and the
    rest trains; fold 0 is ``data`` itself."""
    records, test, dev = data.test + data.dev + data.train, len(data.test), len(data.dev)
    if count * test > len(records):
        raise SystemExit(f"--folds {count}: only {len(records) // test} disjoint test splits of {test} in {len(records)} records")
    rotated = [records[k * test:] + records[:k * test] for k in range(count)]
    return [replace(data, test=r[:test], dev=r[test:test + dev], train=r[test + dev:]) for r in rotated]


def summarise(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_gains(scores: dict[str, dict[str, list[float]]]) -> str:
    """Each row's exact-match gain over scratch paired run by run (same seed, same fold): folds differ in
    difficulty for every row alike, so the paired difference is the sharper comparison than the rows' spreads."""
    lines = []
    for model, metrics in scores.items():
        if model != "scratch":
            gaps = [a - b for a, b in zip(metrics["exact_match"], scores["scratch"]["exact_match"], strict=True)]
            mean, spread = summarise(gaps)
            lines.append(f"- {model} − scratch, exact match paired by seed and fold: {100 * mean:+.2f} "
                         f"(std {100 * spread:.2f}, standard error {100 * spread / len(gaps) ** 0.5:.2f}, {len(gaps)} pairs; "
                         f"beyond 2σ = {200 * spread:.2f}: {'yes' if mean > 2 * spread else 'no'})")
    return "\n".join(lines) + "\n"


def table(name: str, title: str, rows: dict[str, dict], parameters: dict[str, int], runs: int) -> str:
    base = rows["scratch"]
    lines = [f"### {title}", "",
             "| model | non-emb. params | intent acc. | slot F1 | exact match | Δ EM err. vs scratch | EM gain beyond 2σ |",
             "|---|---:|---:|---:|---:|---:|:---:|"]
    for model, scores in rows.items():
        cells = [f"{100 * scores[metric][0]:.2f} ± {100 * scores[metric][1]:.2f}" for metric in METRICS]
        base_error, error = 1 - base["exact_match"][0], 1 - scores["exact_match"][0]
        change = "—" if model == "scratch" else f"{100 * (error - base_error) / max(base_error, 1e-9):+.1f}%"
        gain = scores["exact_match"][0] - base["exact_match"][0]
        spread = 2 * max(scores["exact_match"][1], base["exact_match"][1])
        if model == "scratch":
            verdict = "—"
        elif runs < 2:  # one run has no spread to compare with
            verdict = f"n/a ({100 * gain:+.2f}, one seed)"
        else:
            verdict = f"yes (+{100 * gain:.2f})" if gain > spread else f"no ({100 * gain:+.2f}, 2σ {100 * spread:.2f})"
        lines.append(f"| {model} | {parameters[model]:,} | " + " | ".join(cells) + f" | {change} | {verdict} |")
    return "\n".join(lines) + "\n"


def distil_from(preset: str, overrides: list[str], teacher: str, run_dir: Path, use_ray: bool) -> Path:
    """The pipeline's masked-LM stages with ``teachers.stage1=teacher`` (skipped when up to date): its final student."""
    config = load_config(preset, [*overrides, f"teachers.stage1={teacher}", f"run_dir={run_dir}"])
    run_stages(config, MASKED_LM_STAGES, run_dir, use_ray=use_ray)
    return run_dir / FINAL_DISTILL / EXPORT_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--teacher", action="append", default=[], metavar="NAME=DIR",
                        help="one more row: the final student distilled from this masked-LM folder (teachers.stage1=DIR)")
    parser.add_argument("--max-train-records", type=int, default=None,
                        help="fine-tune on the first N training utterances (a low-resource setting; the tiny preset's 2,000)")
    parser.add_argument("--no-ray", action="store_true", help="train and fine-tune in this process")
    parser.add_argument("--jobs", type=int, default=1,
                        help="with --no-ray: fine-tunings at once, in processes sharing the cores (small models use many threads "
                             "poorly: on 2 cores, two 1-thread fine-tunings of a 2×256 model each took 1.7× as long "
                             "as one on 2 threads, so the bench finishes ~1.2× sooner)")
    parser.add_argument("--folds", type=int, default=1,
                        help="for a dataset without its own test split (SLURP devel): test K disjoint held-out splits in "
                             "turn (cross-validation; at most 1 / finetune.test_fraction)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.folds < 1:
        parser.error("--folds: a positive number")
    if args.jobs < 1 or (args.jobs > 1 and not args.no_ray):
        parser.error("--jobs: a positive number, and more than 1 only with --no-ray (under Ray, Ray Train places each fine-tuning)")
    config = load_config(args.preset, args.overrides)
    run_dir = Path(args.run_dir or config.resolved_run_dir())
    if not (run_dir / FINAL_DISTILL / EXPORT_DIR / "config.json").is_file():
        sys.exit(f"{run_dir}: no final student; run `atm-ray pipeline --preset {args.preset}` first")
    if "mlm_only" in args.models:
        train_mlm_only(config, run_dir, use_ray=not args.no_ray)
    exports = {model: run_dir / MODELS[model] / EXPORT_DIR for model in args.models}
    for model, directory in list(exports.items()):
        # a teacher the run was given (teachers.*) is not trained there, and the joint model takes only
        # atm-ray's pre-LN encoders: its students are the rows that measure it
        model_type = json.loads((directory / "config.json").read_text()).get("model_type") if (directory / "config.json").is_file() else None
        if model_type != "roberta-prelayernorm":
            print(f"row {model}: left out ({directory} is {'missing' if model_type is None else 'a ' + model_type + ' model'})")
            del exports[model]
    for text in args.teacher:
        name, _, directory = text.partition("=")
        if not name or not directory:
            sys.exit(f"--teacher {text!r}: expected NAME=DIR")
        exports[f"final_from_{name}"] = distil_from(args.preset, args.overrides, directory, run_dir / f"from_{name}", not args.no_ray)
    parameters = {model: non_embedding_parameters(directory) for model, directory in exports.items()}

    sections, results = [], {}
    for dataset in args.datasets:
        source_format, path, bundled = DATASETS[dataset]
        located = path if files.exists(files.resolve(path, config.data.root)) else bundled
        splits = split_sources([NluSource(format=source_format, path=located)], config.data.root)
        if args.max_train_records:
            splits["train"] = [source.model_copy(update={"max_records": args.max_train_records}) for source in splits["train"]]
        data = load_nlu_data(config.finetune.model_copy(update=splits), config.data.root, config.data.strict, seed=0)  # same splits every seed
        # a dataset with its own test split has one fold; fold 0 keeps the names of runs made before --folds
        parts = folds(data, args.folds) if not splits["test"] else [data]
        if args.folds > 1 and splits["test"]:
            print(f"{dataset}: has its own test split, so one fold (--folds is for a dataset cut from one file)")
        runs = {(seed, fold, model): (config.model_copy(update={"seed": seed, "finetune": config.finetune.model_copy(update=splits)}),
                                      part, directory, f"nlu_quality/{dataset}{f'_fold{fold}' if fold else ''}_{model}_seed{seed}",
                                      model == "scratch", run_dir, not args.no_ray)
                for seed in args.seeds for fold, part in enumerate(parts) for model, directory in exports.items()}
        tests: dict[tuple[int, int, str], dict] = {}

        def done(key: tuple[int, int, str], test: dict) -> None:
            tests[key] = test
            seed, fold, model = key
            print(f"{dataset} seed {seed}{f' fold {fold}' if len(parts) > 1 else ''} {model}: "
                  + ", ".join(f"{metric} {100 * test[metric]:.2f}" for metric in METRICS), flush=True)

        if args.jobs == 1:
            for key, arguments in runs.items():
                done(key, fine_tune_and_score(*arguments))
        else:
            threads = max(1, len(os.sched_getaffinity(0)) // args.jobs)
            # spawn: a fresh interpreter per worker, not a fork of this one's torch thread pool
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(fine_tune_and_score, *arguments, threads): key for key, arguments in runs.items()}
                for future in as_completed(futures):
                    done(futures[future], future.result())
        # one value per (seed, fold), seeds outermost: with one fold, one per seed as before
        keys = [(seed, fold) for seed in args.seeds for fold in range(len(parts))]
        scores = {model: {metric: [tests[seed, fold, model][metric] for seed, fold in keys] for metric in METRICS} for model in exports}
        rows = {model: {metric: summarise(values) for metric, values in metrics.items()} for model, metrics in scores.items()}
        results[dataset] = {"rows": rows, "per_seed": scores, "seeds": args.seeds, "folds": len(parts), "data": located}
        epochs, patience = config.finetune.schedule(config.finetune.steps_per_epoch(len(data.train)))
        results[dataset]["finetune"] = {"epochs": epochs, "patience": patience}
        over = f"seeds {args.seeds}" + (f" × {len(parts)} folds (each a disjoint test split; ± over seed-fold runs)" if len(parts) > 1 else "")
        title = (f"{dataset} ({located}; {len(data.train)} train / {len(data.dev)} dev / {len(data.test)} test; "
                 f"{epochs} epochs, patience {patience}; {over})")
        sections.append(table(dataset, title, rows, parameters, len(keys)))
        if len(parts) > 1:
            sections.append(paired_gains(scores))

    # the fine-tuning every row had, so that a results file says how to reproduce it
    finetune = config.finetune
    setting = {"command": " ".join(["python", *sys.argv]), "overrides": args.overrides,
               "max_train_records": args.max_train_records,
               "finetune": finetune.model_dump(include={"max_epochs", "patience", "min_steps", "learning_rate", "batch_size"})}
    report = (f"# NLU quality, preset {config.name}\n\n`{setting['command']}`: fine-tuning {finetune.max_epochs} epochs "
              f"(patience {finetune.patience}{f'; at least {finetune.min_steps} steps, see each table' if finetune.min_steps else ''}), "
              f"lr {finetune.learning_rate:g}, batch {finetune.batch_size}.\n\n"
              "Mean ± standard deviation over fine-tuning seeds (and folds where a table says so), in %. "
              "A gain counts when it exceeds twice the larger standard deviation of the two rows.\n\n"
              + "\n".join(sections) + "\n" + ANCHORS + "\n")
    print(report)
    atomic_write_text(run_dir / "nlu_quality.md", report)
    atomic_write_json(run_dir / "nlu_quality.json", {**results, "setting": setting})


if __name__ == "__main__":
    main()
