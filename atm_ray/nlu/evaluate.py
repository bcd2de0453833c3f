"""Scoring fine-tuned models on labelled data and comparing them with a baseline (relative error change,
as the paper reports), overall and per language; written as markdown and JSON."""

from __future__ import annotations

from pathlib import Path

from atm_ray.config import AtmRayError
from atm_ray.nlu.model import Parser
from atm_ray.nlu.metrics import comparison, comparison_markdown, nlu_scores
from atm_ray.utils import atomic_write_json, atomic_write_text


def score_model(model_dir: str | Path, records: list[dict]) -> dict:
    parser = Parser(model_dir)
    return nlu_scores(records, parser.predict([record["tokens"] for record in records]))


def compare_models(models: dict[str, str | Path], records: list[dict], baseline: str | None = None) -> dict:
    """Scores of every named model on ``records`` and the comparison against ``baseline`` (default: the
    first model), overall and for each language."""
    if not models:
        raise AtmRayError("no models to evaluate")
    if not records:
        raise AtmRayError("no labelled records to evaluate on")
    baseline = baseline or next(iter(models))
    scores = {name: score_model(directory, records) for name, directory in models.items()}
    languages = sorted(next(iter(scores.values()))["by_lang"])
    return {
        "overall": comparison(scores, baseline),
        "by_lang": {
            lang: comparison({name: result["by_lang"][lang] for name, result in scores.items()}, baseline)
            for lang in languages
        },
        "models": {name: str(directory) for name, directory in models.items()},
        "scores": scores,
    }


def comparison_report(result: dict, data_description: str) -> str:
    lines = [f"## NLU comparison on {data_description}", ""]
    lines.append(comparison_markdown(result["overall"], "all languages"))
    if len(result["by_lang"]) > 1:
        for lang, table in result["by_lang"].items():
            lines.append(comparison_markdown(table, f"language: {lang}"))
    lines.append("Models:\n")
    lines += [f"- `{name}`: {directory}" for name, directory in result["models"].items()]
    return "\n".join(lines) + "\n"


def write_comparison(result: dict, output_dir: str | Path, data_description: str) -> tuple[Path, Path]:
    output_dir = Path(output_dir)
    markdown, json_path = output_dir / "comparison.md", output_dir / "comparison.json"
    atomic_write_text(markdown, comparison_report(result, data_description))
    atomic_write_json(json_path, result)
    return markdown, json_path
