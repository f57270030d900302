"""Task metrics on generated answers: exact match, and JSON validity with per-field precision/recall/F1.

JSON field scores compare (field, value) pairs: a predicted pair counts when the reference has the same
field with the same value (compared as canonical JSON, so key order and spacing do not matter). Precision
is over the pairs the model produced, recall over the pairs the reference has, both micro-averaged over
the whole set; an answer that is not a JSON object produces no pairs.
"""

import json
from collections import Counter
from typing import Any


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def parse_json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _pairs(obj: dict[str, Any] | None, fields: list[str]) -> set[tuple[str, str]]:
    if obj is None:
        return set()
    return {(key, json.dumps(obj[key], sort_keys=True)) for key in fields if key in obj}


def score_answers(
    predictions: list[str], references: list[str], json_fields: list[str] | None
) -> dict[str, Any]:
    """Metrics over a set of answers; JSON metrics only when `json_fields` names the keys to score."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    count = max(len(predictions), 1)
    metrics: dict[str, Any] = {
        "count": len(predictions),
        "exact_match": sum(map(exact_match, predictions, references)) / count,
    }
    if json_fields is None:
        return metrics
    matched = produced = expected = valid = 0
    per_field: Counter[str] = Counter()
    for prediction, reference in zip(predictions, references, strict=True):
        parsed = parse_json_object(prediction)
        valid += parsed is not None
        predicted_pairs = _pairs(parsed, json_fields)
        reference_pairs = _pairs(parse_json_object(reference), json_fields)
        hits = predicted_pairs & reference_pairs
        matched += len(hits)
        produced += len(predicted_pairs)
        expected += len(reference_pairs)
        per_field.update(key for key, _ in hits)
    precision = matched / produced if produced else 0.0
    recall = matched / expected if expected else 0.0
    metrics.update(
        json_valid=valid / count,
        json_field_precision=precision,
        json_field_recall=recall,
        json_field_f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        json_field_accuracy={key: per_field[key] / count for key in json_fields},
    )
    return metrics


def headline_metric(json_fields: list[str] | None) -> str:
    """The one number a run is judged by: JSON field F1 for structured tasks, else exact match."""
    return "json_field_f1" if json_fields is not None else "exact_match"
