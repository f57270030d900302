"""Task metrics against hand-computed values."""

import json

import pytest

from llamatailor.evaluate.metrics import score_answers


def test_exact_match_ignores_surrounding_whitespace_only():
    metrics = score_answers([" a ", "b", "C"], ["a", "b ", "c"], None)
    assert metrics == {"count": 3, "exact_match": pytest.approx(2 / 3)}


def test_json_field_precision_recall_f1_by_hand():
    ref = json.dumps({"a": 1, "b": [1, 2], "c": "x"})
    predictions = [
        json.dumps({"b": [1, 2], "a": 1, "c": "x"}),  # 3 of 3 right, other key order
        json.dumps({"a": 2, "b": [1, 2]}),  # 1 right of 2 produced, 3 expected
        "not json",  # nothing produced
        json.dumps([1, 2]),  # valid JSON, but not an object
    ]
    metrics = score_answers(predictions, [ref] * 4, ["a", "b", "c"])
    # matched 4, produced 5, expected 12
    assert metrics["json_field_precision"] == pytest.approx(4 / 5)
    assert metrics["json_field_recall"] == pytest.approx(4 / 12)
    p, r = 4 / 5, 4 / 12
    assert metrics["json_field_f1"] == pytest.approx(2 * p * r / (p + r))
    assert metrics["json_valid"] == pytest.approx(2 / 4)
    assert metrics["json_field_accuracy"] == {"a": 0.25, "b": 0.5, "c": 0.25}
    assert metrics["exact_match"] == 0.0


def test_lengths_must_match():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score_answers(["a", "b"], ["a"], None)
