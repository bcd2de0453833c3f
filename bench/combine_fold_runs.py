"""Two runs of ``bench/nlu_quality.py --datasets slurp_devel --models scratch final --folds K`` with
different seeds, combined run by run (their data, folds and fine-tuning settings are checked equal): the
rows over every seed-fold run, the gain paired by seed and fold, the gain per fold, and how much of its
spread is seed against fold. Adds seeds to a cross-validation without redoing the seeds already run.

    python bench/combine_fold_runs.py FIRST.json SECOND.json > combined.md
"""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("nlu_quality", Path(__file__).with_name("nlu_quality.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def main(first: str, second: str) -> str:
    a, b = (json.loads(Path(path).read_text())["slurp_devel"] for path in (first, second))
    for key in ("folds", "finetune", "data"):
        if a[key] != b[key]:
            sys.exit(f"the runs differ in {key}: {a[key]} against {b[key]}")
    seeds, folds = a["seeds"] + b["seeds"], a["folds"]
    # each run lists one value per (seed, fold), seeds outermost
    scores = {model: {metric: a["per_seed"][model][metric] + b["per_seed"][model][metric] for metric in bench.METRICS}
              for model in ("scratch", "final")}
    lines = [f"# SLURP devel, {folds} folds × seeds {seeds}, scratch vs final", "",
             f"`python bench/combine_fold_runs.py {first} {second}` (same models, data and fine-tuning settings). "
             "Mean ± std over every seed-fold run.", "",
             "| row | intent acc. | slot F1 | exact match |", "|---|---:|---:|---:|"]
    for model, metrics in scores.items():
        cells = [f"{100 * mean:.2f} ± {100 * spread:.2f}" for mean, spread in (bench.summarise(metrics[m]) for m in bench.METRICS)]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", bench.paired_gains({model: {"exact_match": metrics["exact_match"]} for model, metrics in scores.items()})]

    gaps = [final - scratch for final, scratch in zip(scores["final"]["exact_match"], scores["scratch"]["exact_match"], strict=True)]
    per_fold = [[gaps[seed * folds + fold] for seed in range(len(seeds))] for fold in range(folds)]
    fold_means = [statistics.mean(fold) for fold in per_fold]
    lines += ["| fold | exact-match gain per seed | mean |", "|---|---|---:|"]
    lines += [f"| {fold} | " + ", ".join(f"{100 * gap:+.2f}" for gap in gains) + f" | {100 * fold_means[fold]:+.2f} |"
              for fold, gains in enumerate(per_fold)]
    per_seed = [statistics.mean(gaps[index * folds:(index + 1) * folds]) for index in range(len(seeds))]
    within = statistics.mean(statistics.variance(gains) for gains in per_fold) ** 0.5
    fold_zero = {model: ", ".join(f"{100 * scores[model]['exact_match'][index * folds]:.2f}" for index in range(len(seeds))) for model in scores}
    lines += ["", "- mean gain per seed over the folds: " + ", ".join(f"seed {seed} {100 * gap:+.2f}" for seed, gap in zip(seeds, per_seed)),
              f"- spread of the gain between seeds within a fold (pooled std) {100 * within:.2f}; "
              f"between the folds' means (std) {100 * statistics.stdev(fold_means):.2f}",
              f"- fold 0 (the default split), exact match per seed: scratch {fold_zero['scratch']}; final {fold_zero['final']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(main(sys.argv[1], sys.argv[2]), end="")
