"""Task metrics against hand-computed values and sacrebleu's own outputs."""

import json

import pytest
import sacrebleu

from llamatailor.evaluate.metrics import example_score, rouge_l, score_answers
from llamatailor.evaluate.semantic import similarities

HYPOTHESES = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFERENCES = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]


def test_exact_match_ignores_surrounding_whitespace_only():
    assert score_answers([" a ", "b", "C"], ["a", "b ", "c"], None)["exact_match"] == pytest.approx(2 / 3)


def test_bleu_and_chrf_are_sacrebleus_corpus_scores():
    metrics = score_answers(HYPOTHESES, REFERENCES, None)
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score)
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES]).score)
    assert 0 < metrics["bleu"] < 100 and 0 < metrics["chrf"] < 100
    perfect = score_answers(REFERENCES, REFERENCES, None)
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100)


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is "the cat on the mat": 5 of 6 words each way.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("completely different", "the cat is on the mat") == 0.0
    assert score_answers(["the cat sat on the mat"], ["the cat is on the mat"], None)[
        "rouge_l"
    ] == pytest.approx(5 / 6)


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
    assert example_score(predictions[1], ref, ["a", "b", "c"]) == pytest.approx(2 * 1 / (2 + 3))


def test_semantic_similarity_ranks_paraphrases_above_unrelated_text():
    same, paraphrase, unrelated = similarities(
        [
            "The invoice was paid on Monday.",
            "The invoice was paid on Monday.",
            "The invoice was paid on Monday.",
        ],
        [
            "The invoice was paid on Monday.",
            "Payment of the bill happened Monday.",
            "Penguins live in Antarctica.",
        ],
    )
    assert same == pytest.approx(1.0, abs=1e-5)
    assert paraphrase > 0.6 > unrelated
    assert "semantic_similarity" in score_answers(["a b"], ["a b"], None, semantic=True)


def test_lengths_must_match():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score_answers(["a", "b"], ["a"], None)
