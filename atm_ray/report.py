"""The run report: ``<run>/report.md`` with PNG plots under ``<run>/report/``, built from what the stages
wrote (``metrics.json``, ``manifest.json``, exports, ``evaluation/comparison.md``, sweeps). The pipeline
writes it last; ``atm-ray report RUN_DIR`` rebuilds it at any time, also for a run still in progress.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from atm_ray.config import ModelShape
from atm_ray.train.engine import EXPORT_DIR
from atm_ray.train.modeling import count_parameters
from atm_ray.train.stage_table import DOMAINS, FINETUNE_STAGES, INTERMEDIATE_DISTILL, MASKED_LM_STAGES, STAGES
from atm_ray.utils import atomic_write_text, read_json

MLM_STAGES = {name: STAGES[name].description for name in MASKED_LM_STAGES}
FINETUNE_DESCRIPTIONS = {name: STAGES[name].description for name in FINETUNE_STAGES}


def _history(stage_dir: Path) -> list[dict]:
    """The stage's evaluations: the finished history, else the live log of a stage still running."""
    if (stage_dir / "metrics.json").is_file():
        return read_json(stage_dir / "metrics.json")
    if (stage_dir / "metrics.jsonl").is_file():
        return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return []


def _number(value, digits: int = 4) -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:,.{digits}g}" if isinstance(value, float) else f"{value:,d}"
    return "–"


def parameter_counts(export_dir: Path) -> dict | None:
    """Layers, width and parameter counts of an export, from its config.json (no weights loaded)."""
    config_file = export_dir / "config.json"
    if not config_file.is_file():
        return None
    config = read_json(config_file)
    shape = ModelShape(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        num_heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        max_positions=config["max_position_embeddings"] - int(config.get("pad_token_id") or 0) - 1,
    )
    count = count_parameters(shape, config["vocab_size"])
    return {"shape": shape, "embedding": count.embedding, "non_embedding": count.non_embedding, "total": count.total}


# ---------------------------------------------------------------------- plots


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> Path:
    """Write a PNG atomically (a reader never sees half of it) and close the figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.png")
    figure.savefig(partial, dpi=90)
    pyplot().close(figure)
    partial.replace(path)
    return path


def _switch_step(history: list[dict]) -> int | None:
    steps = [entry["teacher_switch_step"] for entry in history if entry.get("teacher_switch_step") is not None]
    return steps[-1] if steps else None


def plot_loss_and_perplexity(histories: dict[str, list[dict]], path: Path) -> Path:
    plt = pyplot()
    stages = list(histories)
    figure, axes = plt.subplots(2, len(stages), figsize=(3.4 * len(stages), 5.6), squeeze=False)
    for column, stage in enumerate(stages):
        history = histories[stage]
        steps = [entry["step"] for entry in history]
        top, bottom = axes[0][column], axes[1][column]
        for name in ("train_loss", "mlm_loss", "soft_ce_loss", "hidden_loss"):
            if any(name in entry for entry in history):
                top.plot(steps, [entry.get(name, math.nan) for entry in history], marker=".", label=name)
        for domain, style in zip(DOMAINS, ("-", "--")):
            bottom.plot(steps, [entry.get(f"{domain}/perplexity", math.nan) for entry in history], style, marker=".", label=domain)
        switch = _switch_step(history)
        for axis in (top, bottom):
            if switch is not None:
                axis.axvline(switch, color="C3", linestyle=":", label="teacher switch")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        top.set_title(stage, fontsize=9)
        bottom.set_yscale("log")
        bottom.set_xlabel("step")
    axes[0][0].set_ylabel("training loss")
    axes[1][0].set_ylabel("held-out perplexity")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_mask_filling(histories: dict[str, list[dict]], path: Path) -> Path:
    plt = pyplot()
    stages = list(histories)
    figure, axes = plt.subplots(1, len(stages), figsize=(3.4 * len(stages), 3.2), squeeze=False, sharey=True)
    for axis, stage in zip(axes[0], stages):
        history = histories[stage]
        steps = [entry["step"] for entry in history]
        for domain, color in zip(DOMAINS, ("C0", "C1")):
            axis.plot(steps, [entry.get(f"{domain}/mask_fill_accuracy", math.nan) for entry in history], "-", color=color,
                      marker=".", label=f"{domain}")
            axis.plot(steps, [entry.get(f"{domain}/noun_mask_fill_accuracy", math.nan) for entry in history], "--",
                      color=color, label=f"{domain}, nouns")
            unigram = [entry.get(f"{domain}/unigram_mask_fill_accuracy", math.nan) for entry in history]
            if not all(map(math.isnan, unigram)):
                axis.plot(steps, unigram, ":", color=color, alpha=0.7, label=f"{domain}, most frequent token")
        switch = _switch_step(history)
        if switch is not None:
            axis.axvline(switch, color="C3", linestyle=":", label="teacher switch")
        axis.set_title(stage, fontsize=9)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 mask-filling accuracy")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_finetuning(histories: dict[str, list[dict]], path: Path) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(10, 3), squeeze=False)
    for axis, name in zip(axes[0], ("intent_accuracy", "slot_f1", "exact_match")):
        for stage, history in histories.items():
            axis.plot([entry["epoch"] for entry in history], [entry.get(f"dev/{name}", math.nan) for entry in history],
                      marker=".", label=FINETUNE_DESCRIPTIONS.get(stage, stage))
        axis.set_title(f"dev {name}", fontsize=9)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path)


# ---------------------------------------------------------------------- the report


def write_report(run_dir: str | Path) -> Path:
    """Build ``<run_dir>/report.md`` and its plots from whatever stages have run; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    histories = {stage: _history(run_dir / stage) for stage in MLM_STAGES}
    histories = {stage: history for stage, history in histories.items() if history}
    finetune = {stage: _history(run_dir / stage) for stage in FINETUNE_STAGES}
    finetune = {stage: history for stage, history in finetune.items() if history}
    if not histories and not finetune:
        raise FileNotFoundError(f"{run_dir}: no stage has written metrics yet (is this a run folder?)")
    figures = run_dir / "report"

    lines = [f"# atm-ray run report: `{run_dir.resolve()}`", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", ""]
    lines += _stage_table(run_dir, histories)
    lines += _parameter_table(run_dir)
    lines += _switch_section(histories)
    if histories:
        lines += ["## Loss and perplexity", "",
                  f"![loss and perplexity per stage](report/{plot_loss_and_perplexity(histories, figures / 'loss_perplexity.png').name})", "",
                  "## Mask filling (written vs spoken held-out text)", "",
                  "Solid: all masked tokens; dashed: sub-words of nouns (UD NOUN/PROPN, PTB NN*); dotted: always "
                  "guessing the most frequent training token on the same masks (the unigram plateau).", "",
                  f"![mask-filling accuracy per stage](report/{plot_mask_filling(histories, figures / 'mask_filling.png').name})", ""]
    if finetune:
        lines += ["## Fine-tuning (intent + slots)", "",
                  f"![dev scores per epoch](report/{plot_finetuning(finetune, figures / 'finetuning.png').name})", ""]
    comparison = run_dir / "evaluation" / "comparison.md"
    if comparison.is_file():
        body = comparison.read_text().splitlines()
        lines += [line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in body]
        lines += ["", "Relative error change: (error − baseline error) / baseline error; negative is better.", ""]
    ablation = run_dir / "nlu_quality.md"
    if ablation.is_file():  # bench/nlu_quality.py: what each step of the recipe buys
        lines += ["## What each step buys (bench/nlu_quality.py)", ""]
        lines += [line.replace("# ", "### ", 1) if line.startswith("# ") else line for line in ablation.read_text().splitlines()[1:]]
        lines += [""]
    lines += _sweep_section(run_dir)
    report = run_dir / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


def _stage_table(run_dir: Path, histories: dict[str, list[dict]]) -> list[str]:
    lines = ["## Stages", "",
             "| stage | what | state | steps | train loss | written ppl | spoken ppl | spoken mask fill "
             "(most frequent token) | resumed at | export |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for stage, description in {**MLM_STAGES, **FINETUNE_DESCRIPTIONS}.items():
        stage_dir = run_dir / stage
        if not stage_dir.is_dir():
            continue
        manifest = read_json(stage_dir / "manifest.json") if (stage_dir / "manifest.json").is_file() else None
        state = "finished" if manifest else "in progress or interrupted"
        if manifest and manifest.get("provided"):
            lines.append(f"| {stage} | {description} | your teacher (teachers.*), not trained here | – | – | – | – | – | – | "
                         f"{manifest['outputs']['export']} |")
            continue
        if stage in FINETUNE_STAGES:
            metrics = manifest["metrics"] if manifest else {}
            lines.append(
                f"| {stage} | {description} | {state} | {metrics.get('epochs', '–')} epochs | – | – | – | "
                f"test EM {_number(metrics.get('test/exact_match'))} | – | {manifest['outputs']['export'] if manifest else '–'} |"
            )
            continue
        history = histories.get(stage, [])
        last = history[-1] if history else {}
        resumes = sorted({entry.get("resumed_from_step", 0) for entry in history} - {0})
        lines.append(
            f"| {stage} | {description} | {state} | {_number(last.get('step'))} | {_number(last.get('train_loss'))} | "
            f"{_number(last.get('written/perplexity'))} | {_number(last.get('spoken/perplexity'))} | "
            f"{_number(last.get('spoken/mask_fill_accuracy'))} ({_number(last.get('spoken/unigram_mask_fill_accuracy'))}) | "
            f"{', '.join(map(str, resumes)) or '–'} | "
            f"{stage_dir / EXPORT_DIR if manifest else '–'} |"
        )
    return lines + [""]


def _parameter_table(run_dir: Path) -> list[str]:
    rows = []
    for stage in MLM_STAGES:
        manifest = run_dir / stage / "manifest.json"
        provided = manifest.is_file() and read_json(manifest).get("provided")
        counts = parameter_counts(Path(read_json(manifest)["outputs"]["export"]) if provided else run_dir / stage / EXPORT_DIR)
        if counts:
            shape = counts["shape"]
            rows.append(f"| {stage} | {shape.num_layers} | {shape.hidden_size} | {shape.num_heads} | {shape.intermediate_size} | "
                        f"{counts['embedding']:,} | {counts['non_embedding']:,} | {counts['total']:,} |")
    if not rows:
        return []
    return ["## Parameter counts", "",
            "| model | layers | hidden | heads | ffn | embedding | non-embedding | total |",
            "|---|---|---|---|---|---|---|---|", *rows, ""]


def _switch_section(histories: dict[str, list[dict]]) -> list[str]:
    history = histories.get(INTERMEDIATE_DISTILL)
    if not history:
        return []
    switch = _switch_step(history)
    if switch is None:
        text = "The intermediate student learned from the Stage-1 teacher throughout (no switch recorded)."
    else:
        text = (f"The intermediate student switched from the Stage-1 to the Stage-2 teacher at step {switch} "
                f"(of {history[-1]['step']}); the plots mark it with a dotted line.")
    return ["## Teacher switch", "", text, ""]


def _sweep_section(run_dir: Path) -> list[str]:
    lines = []
    for sweep_dir in sorted(run_dir.glob("sweep_*")):
        state = sweep_dir / "sweep.json"
        if not state.is_file():
            continue
        best = read_json(state).get("best")
        line = f"- `{sweep_dir.name}`: [results]({sweep_dir.name}/results.md), [plot]({sweep_dir.name}/metric_vs_params.png)"
        if best:
            line += f"; best trial {best['trial_id']}: {best['select_by']} = {best['value']:.4f} ({sweep_dir.name}/best_overrides.yaml)"
        lines.append(line)
    return ["## Sweeps", "", *lines, ""] if lines else []
