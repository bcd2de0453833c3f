"""Intent/slot metrics: intent accuracy, slot micro-F1 with CoNLL span semantics, exact match, per
language, and the paper's relative error change against a baseline. Plain functions, no model."""

from __future__ import annotations

import math
from collections import defaultdict

from atm_ray.config import AtmRayError


def slot_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """``(slot, first word, last word)`` chunks of a BIO sequence, as conlleval and seqeval read them:
    a chunk starts at ``B-x``, or at ``I-x`` after anything but ``x``; it ends before ``O``, ``B-``, or a
    tag of another slot."""
    spans = set()
    start, current = None, None
    for index, tag in enumerate(list(tags) + ["O"]):
        prefix, slot = (tag[:1], tag[2:]) if tag != "O" else ("O", None)
        continues = prefix == "I" and slot == current
        if current is not None and not continues:
            spans.add((current, start, index - 1))
            current = None
        if prefix in ("B", "I") and not continues:
            start, current = index, slot
    return spans


def slot_counts(gold: list[str], predicted: list[str]) -> tuple[int, int, int]:
    """(correct, predicted, gold) chunk counts of one utterance."""
    gold_spans, predicted_spans = slot_spans(gold), slot_spans(predicted)
    return len(gold_spans & predicted_spans), len(predicted_spans), len(gold_spans)


def f1_from_counts(correct: int, predicted: int, gold: int) -> dict[str, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"slot_precision": precision, "slot_recall": recall, "slot_f1": f1}


def nlu_scores(gold: list[dict], predicted: list[dict]) -> dict:
    """Scores of ``predicted`` against ``gold``; both are lists of ``{"intent", "slot_tags", "lang"}``
    (gold's ``lang`` is used). Returns overall scores and the same per language under ``by_lang``."""
    if len(gold) != len(predicted):
        raise AtmRayError(f"{len(gold)} gold records but {len(predicted)} predictions")
    groups: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for gold_record, predicted_record in zip(gold, predicted):
        if len(gold_record["slot_tags"]) != len(predicted_record["slot_tags"]):
            raise AtmRayError(
                f"a prediction has {len(predicted_record['slot_tags'])} slot tags for "
                f"{len(gold_record['slot_tags'])} words"
            )
        groups[gold_record.get("lang") or "?"].append((gold_record, predicted_record))

    def score(pairs: list[tuple[dict, dict]]) -> dict:
        intents_right = slots_all_right = 0
        counts = [0, 0, 0]
        for gold_record, predicted_record in pairs:
            intent_right = gold_record["intent"] == predicted_record["intent"]
            correct, n_predicted, n_gold = slot_counts(gold_record["slot_tags"], predicted_record["slot_tags"])
            counts = [counts[0] + correct, counts[1] + n_predicted, counts[2] + n_gold]
            intents_right += intent_right
            # exact frame: the intent and every slot (spans and names) right
            frame_right = intent_right and slot_spans(gold_record["slot_tags"]) == slot_spans(predicted_record["slot_tags"])
            slots_all_right += frame_right
        total = max(len(pairs), 1)
        return {
            "count": len(pairs),
            "intent_accuracy": intents_right / total,
            **f1_from_counts(*counts),
            "exact_match": slots_all_right / total,
        }

    all_pairs = [pair for pairs in groups.values() for pair in pairs]
    result = score(all_pairs)
    result["by_lang"] = {lang: score(pairs) for lang, pairs in sorted(groups.items())}
    return result


def relative_error_change(score: float, baseline_score: float) -> float:
    """(err - err_base) / err_base with err = 1 - score: negative when the model makes fewer errors.
    A baseline without errors gives 0 for a model without errors too, else +inf."""
    error, baseline_error = 1.0 - score, 1.0 - baseline_score
    if baseline_error <= 0:
        return 0.0 if error <= 0 else math.inf
    return (error - baseline_error) / baseline_error


HEADLINE_METRICS = ("intent_accuracy", "slot_f1", "exact_match")


def comparison(scores: dict[str, dict], baseline: str) -> dict:
    """Every model's headline metrics and, against ``baseline``, the relative error change of each."""
    if baseline not in scores:
        raise AtmRayError(f"baseline {baseline!r} is not one of the models {sorted(scores)}")
    table = {}
    for name, result in scores.items():
        row = {metric: result[metric] for metric in HEADLINE_METRICS}
        row["count"] = result["count"]
        for metric in HEADLINE_METRICS:
            row[f"{metric}_relative_error"] = relative_error_change(result[metric], scores[baseline][metric])
        table[name] = row
    return {"baseline": baseline, "models": table}


def comparison_markdown(result: dict, title: str = "") -> str:
    """A markdown table of ``comparison`` output (metrics in %, relative error change in %)."""
    lines = [f"### {title}", ""] if title else []
    header = "| model | intent acc. | slot F1 | exact match | Δ intent err. | Δ slot err. | Δ EM err. | n |"
    lines += [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in result["models"].items():
        changes = [
            "—" if name == result["baseline"] else f"{100 * row[f'{metric}_relative_error']:+.1f}%"
            for metric in HEADLINE_METRICS
        ]
        lines.append(
            f"| {name} | {100 * row['intent_accuracy']:.2f} | {100 * row['slot_f1']:.2f} | "
            f"{100 * row['exact_match']:.2f} | " + " | ".join(changes) + f" | {row['count']} |"
        )
    lines.append("")
    lines.append(f"Δ: relative error change against `{result['baseline']}`, (err − err_base) / err_base; negative is better.")
    return "\n".join(lines) + "\n"
