import math
import random

import pytest
from seqeval.metrics import f1_score, precision_score, recall_score

from atm_ray.nlu.metrics import (
    comparison,
    comparison_markdown,
    f1_from_counts,
    nlu_scores,
    relative_error_change,
    slot_counts,
    slot_spans,
)


def test_slot_spans_follow_conll_chunk_rules():
    tags = ["B-a", "I-a", "O", "I-b", "B-b", "I-a", "I-a", "B-a", "O"]
    # I- after O or after another slot starts a chunk; B- always starts one
    assert slot_spans(tags) == {("a", 0, 1), ("b", 3, 3), ("b", 4, 4), ("a", 5, 6), ("a", 7, 7)}
    assert slot_spans(["O", "O"]) == set()
    assert slot_spans(["I-x"]) == {("x", 0, 0)}


def _random_tags(rng: random.Random, length: int) -> list[str]:
    return [rng.choice(["O", "O", "B-a", "I-a", "B-b", "I-b", "B-c_d", "I-c_d"]) for _ in range(length)]


def test_slot_f1_agrees_with_seqeval_on_random_and_ill_formed_sequences():
    rng = random.Random(7)
    gold = [_random_tags(rng, rng.randint(1, 12)) for _ in range(400)]
    predicted = [[tag if rng.random() < 0.7 else rng.choice(["O", "B-a", "I-b", "I-c_d"]) for tag in tags] for tags in gold]
    counts = [sum(values) for values in zip(*(slot_counts(g, p) for g, p in zip(gold, predicted)))]
    ours = f1_from_counts(*counts)
    assert ours["slot_f1"] == pytest.approx(f1_score(gold, predicted), abs=1e-12)
    assert ours["slot_precision"] == pytest.approx(precision_score(gold, predicted), abs=1e-12)
    assert ours["slot_recall"] == pytest.approx(recall_score(gold, predicted), abs=1e-12)


def test_nlu_scores_by_hand():
    gold = [
        {"intent": "alarm", "slot_tags": ["O", "B-time", "I-time"], "lang": "en"},
        {"intent": "play", "slot_tags": ["B-song", "O"], "lang": "en"},
        {"intent": "play", "slot_tags": ["O", "B-artist"], "lang": "de"},
    ]
    predicted = [
        {"intent": "alarm", "slot_tags": ["O", "B-time", "I-time"]},  # all right
        {"intent": "play", "slot_tags": ["B-song", "B-song"]},  # intent right, one extra slot
        {"intent": "alarm", "slot_tags": ["O", "B-artist"]},  # slots right, intent wrong
    ]
    scores = nlu_scores(gold, predicted)
    assert scores["count"] == 3
    assert scores["intent_accuracy"] == pytest.approx(2 / 3)
    # gold chunks 3, predicted 4, correct 3
    assert scores["slot_precision"] == pytest.approx(3 / 4)
    assert scores["slot_recall"] == pytest.approx(1.0)
    assert scores["slot_f1"] == pytest.approx(2 * 0.75 / 1.75)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["by_lang"]["en"]["exact_match"] == pytest.approx(1 / 2)
    assert scores["by_lang"]["de"]["intent_accuracy"] == 0.0
    assert scores["by_lang"]["de"]["slot_f1"] == 1.0


def test_nlu_scores_reject_misaligned_predictions():
    with pytest.raises(ValueError, match="2 slot tags for 1 words"):
        nlu_scores([{"intent": "a", "slot_tags": ["O"]}], [{"intent": "a", "slot_tags": ["O", "O"]}])


def test_relative_error_change_sign_and_value():
    # baseline 90% (10% error), model 95% (5% error): half the errors
    assert relative_error_change(0.95, 0.90) == pytest.approx(-0.5)
    assert relative_error_change(0.85, 0.90) == pytest.approx(0.5)
    assert relative_error_change(0.90, 0.90) == 0.0
    assert relative_error_change(1.0, 1.0) == 0.0
    assert math.isinf(relative_error_change(0.99, 1.0))


def test_comparison_table_names_the_baseline():
    scores = {
        "scratch": {"intent_accuracy": 0.9, "slot_f1": 0.8, "exact_match": 0.6, "count": 10},
        "student": {"intent_accuracy": 0.95, "slot_f1": 0.9, "exact_match": 0.7, "count": 10},
    }
    result = comparison(scores, "scratch")
    assert result["models"]["student"]["slot_f1_relative_error"] == pytest.approx(-0.5)
    assert result["models"]["student"]["exact_match_relative_error"] == pytest.approx(-0.25)
    markdown = comparison_markdown(result)
    assert "| student | 95.00 | 90.00 | 70.00 | -50.0% | -50.0% | -25.0% | 10 |" in markdown
    with pytest.raises(ValueError, match="baseline 'bert'"):
        comparison(scores, "bert")
