"""Task metrics on generated answers.

* exact match: the stripped answer equals the stripped reference.
* ROUGE-L: F-measure of the longest common subsequence of words (Google's rouge-score, stemmed), mean
  over answers.
* BLEU and chrF: corpus-level, from sacrebleu with its default settings (13a tokenisation; chrF with
  character 6-grams, beta 2), so they match what sacrebleu itself reports.
* JSON: validity, and per-field precision / recall / F1 over (field, value) pairs: a predicted pair counts
  when the reference has the same field with the same value (compared as canonical JSON, so key order and
  spacing do not matter). Precision is over the pairs the model produced, recall over those the reference
  has, micro-averaged over the whole set; an answer that is not a JSON object produces no pairs.
* semantic similarity: cosine of all-MiniLM-L6-v2 embeddings (see `semantic.py`), mean over answers.
"""

import json
from collections import Counter
from typing import Any

import sacrebleu
from rouge_score import rouge_scorer

from llamatailor.evaluate.semantic import similarities

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def rouge_l(prediction: str, reference: str) -> float:
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


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


def json_field_f1(prediction: str, reference: str, fields: list[str]) -> float:
    """One answer's field F1 (used to rank examples)."""
    predicted, expected = (
        _pairs(parse_json_object(prediction), fields),
        _pairs(parse_json_object(reference), fields),
    )
    hits = len(predicted & expected)
    return 2 * hits / (len(predicted) + len(expected)) if predicted or expected else 0.0


def json_metrics(predictions: list[str], references: list[str], fields: list[str]) -> dict[str, Any]:
    count = max(len(predictions), 1)
    matched = produced = expected = valid = 0
    per_field: Counter[str] = Counter()
    for prediction, reference in zip(predictions, references, strict=True):
        parsed = parse_json_object(prediction)
        valid += parsed is not None
        predicted_pairs = _pairs(parsed, fields)
        reference_pairs = _pairs(parse_json_object(reference), fields)
        hits = predicted_pairs & reference_pairs
        matched += len(hits)
        produced += len(predicted_pairs)
        expected += len(reference_pairs)
        per_field.update(key for key, _ in hits)
    precision = matched / produced if produced else 0.0
    recall = matched / expected if expected else 0.0
    return {
        "json_valid": valid / count,
        "json_field_precision": precision,
        "json_field_recall": recall,
        "json_field_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "json_field_accuracy": {key: per_field[key] / count for key in fields},
    }


def score_answers(
    predictions: list[str], references: list[str], json_fields: list[str] | None, semantic: bool = False
) -> dict[str, Any]:
    """Metrics over a set of answers; JSON metrics when `json_fields` names the keys to score."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    count = len(predictions)
    metrics: dict[str, Any] = {
        "count": count,
        "exact_match": sum(map(exact_match, predictions, references)) / max(count, 1),
        "rouge_l": sum(map(rouge_l, predictions, references)) / max(count, 1),
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score if count else 0.0,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score if count else 0.0,
    }
    if json_fields is not None:
        metrics.update(json_metrics(predictions, references, json_fields))
    if semantic and count:
        metrics["semantic_similarity"] = sum(similarities(predictions, references)) / count
    return metrics


def example_score(prediction: str, reference: str, json_fields: list[str] | None) -> float:
    """One answer's score, in [0, 1], for finding the best and worst examples."""
    if json_fields is not None:
        return json_field_f1(prediction, reference, json_fields)
    return sacrebleu.sentence_chrf(prediction, [reference]).score / 100


def headline_metric(json_fields: list[str] | None) -> str:
    """The one number a run is judged by: JSON field F1 for structured tasks, else chrF."""
    return "json_field_f1" if json_fields is not None else "chrf"
