"""Normalisation that keeps meaning, exact keys, MinHash candidates and exactly verified clusters."""

import numpy as np
import pytest

from helpers import conversation, read_rows, write_jsonl, write_run_file
from llamatailor.config import load_config
from llamatailor.data.dedup import (
    MinHasher,
    ShingleSets,
    exact_key,
    near_duplicate_clusters,
    normalize,
    overlap,
    shingle_hashes,
)
from llamatailor.data.prepare import prepare

STORY = "the quick brown fox jumps over the lazy dog by the river bank at dawn while birds sing softly"
MATHS = ("Solve for x: x + 5 = 0 → x = -5", "Solve for x: x - 5 = 0 → x = 5")

MUST_STAY_APART = [
    MATHS,
    ("[1, 2]", "[12]"),  # brackets and commas
    ("a[i + 1] = b[i]", "a[i - 1] = b[i]"),  # code: operators
    ("if x == y: return a", "if x != y: return a"),  # code: negated comparison
    ("if (!ready) return;", "if (ready) return;"),  # negation by an operator
    ('{"ok": true, "ids": [1, 2]}', '{"ok": true, "ids": [12]}'),  # JSON
    ('{"a": 1}', '{"a": -1}'),  # a sign
    ("Pi is 3.14", "Pi is 314"),  # numbers: decimal point
    ("x ≠ 0", "x = 0"),  # negation by a symbol
    ("Don't restart it.", "Dont restart it."),  # apostrophe
]
MUST_MERGE = [
    ("Ｘ＝１２", "X=12"),  # NFKC: full-width letters, sign and digits
    ("the ﬁle", "the file"),  # NFKC: ligature
    ("10\u00a0kg", "10 kg"),  # NFKC: no-break space
    ("a  b\n\n\tc ", "a b c"),  # whitespace runs
    ("Hello World", "hello world"),  # case (fold_case on)
    ("STRASSE", "Straße"),  # Unicode case folding, not just lower()
]


def key(text: str, fold_case: bool = True) -> int:
    return exact_key(normalize(text, fold_case))


@pytest.mark.parametrize(("a", "b"), MUST_STAY_APART)
def test_meaning_is_kept_apart(a, b):
    assert key(a) != key(b)
    a_sets, b_sets = (shingle_hashes(normalize(t, True)) for t in (a, b))
    shared, union = overlap(a_sets, b_sets)
    assert shared / union < 0.8


@pytest.mark.parametrize(("a", "b"), MUST_MERGE)
def test_what_does_not_change_meaning_is_folded(a, b):
    assert normalize(a, True) == normalize(b, True) and key(a) == key(b)


def test_case_is_kept_unless_folding_is_on():
    assert normalize("Hello  World", False) == "Hello World"
    assert key("Hello World", fold_case=False) != key("hello world", fold_case=False)
    assert key("Ｈｅｌｌｏ", fold_case=False) == key("Hello", fold_case=False)


def test_shingles_are_word_trigrams_with_punctuation_attached():
    hashes = shingle_hashes("a b, c d")
    assert len(hashes) == 2 and np.all(np.diff(hashes.astype(np.float64)) > 0)
    assert np.array_equal(shingle_hashes("a b"), shingle_hashes("a b"))  # under 3 words: one shingle
    assert len(shingle_hashes("a b")) == 1 and len(shingle_hashes("a a a a a")) == 1
    assert overlap(shingle_hashes("a b, c d"), shingle_hashes("a b c d")) == (0, 4)
    assert overlap(shingle_hashes("a b c d e"), shingle_hashes("a b c d f")) == (2, 4)


def test_signatures_estimate_jaccard():
    hasher = MinHasher(128, seed=1)

    def signature(text):
        return hasher.signature(shingle_hashes(normalize(text, True)))

    same = signature(STORY)
    assert np.array_equal(same, signature(STORY.upper()))
    one_word = np.mean(same == signature(STORY.replace("dawn", "dusk")))
    unrelated = np.mean(same == signature("completely different words about cooking pasta tonight"))
    # True Jaccard of the 3-gram sets: 15 of 21 for one changed word; 0 for unrelated text.
    assert 0.55 < one_word < 0.9 and unrelated < 0.1


def cluster(texts, groups=None, threshold=0.8):
    """near_duplicate_clusters over texts, as prepare calls it (same-text records joined first)."""
    sets = [shingle_hashes(normalize(t, True)) for t in texts]
    keys = [exact_key(normalize(t, True)) for t in texts]
    groups = np.zeros(len(texts), dtype=np.int8) if groups is None else np.array(groups, dtype=np.int8)
    same_text_as = np.array(
        [
            next(j for j in range(len(texts)) if (keys[j], groups[j]) == (keys[i], groups[i]))
            for i in range(len(texts))
        ]
    )
    hasher = MinHasher(64, seed=1)
    shingles = ShingleSets.in_memory(np.concatenate(sets), np.cumsum([len(s) for s in sets]))
    signatures = np.stack([hasher.signature(s) for s in sets])
    return near_duplicate_clusters(signatures, groups, same_text_as, shingles, threshold)


def test_clusters_join_near_duplicates_of_the_same_group_only():
    texts = [STORY, "an unrelated sentence about trains and stations", STORY + " today", STORY]
    found = cluster(texts)
    assert found.cluster.tolist() == [0, 1, 0, 0]
    # 18 of the 19 shingles of `texts[2]` are shared with STORY: 18 / 19 = 0.947, the best partner.
    assert found.partner.tolist() == [3, -1, 0, 0]
    assert cluster(texts, groups=[0, 0, 0, 1]).cluster.tolist() == [0, 1, 0, 3]


def test_a_chain_joins_a_cluster_and_each_record_names_a_record_it_is_similar_to():
    words = STORY.split()  # 19 words, 17 shingles
    texts = [
        " ".join(words),
        " ".join(["zero", *words[1:-1], "one"]),  # to 0: 15/19 = 0.789, below the threshold
        " ".join([*words[:-1], "one"]),  # to 0 and to 1: 16/18 = 0.889
    ]
    pairs = ((0, 1), (1, 2), (0, 2))
    assert [overlap(*(shingle_hashes(texts[i]) for i in pair)) for pair in pairs] == [
        (15, 19),
        (16, 18),
        (16, 18),
    ]
    found = cluster(texts)
    assert found.cluster.tolist() == [0, 0, 0]
    # Record 1's only similar record comes after it; record 2 is as similar to 0 as to 1.
    assert found.partner.tolist()[:2] == [2, 2] and found.partner[2] in (0, 1)


def verified_pairs(monkeypatch) -> list[tuple[int, int]]:
    """Every (record, other) pair whose exact similarity near_duplicate_clusters computes, in order."""
    pairs: list[tuple[int, int]] = []
    similarity = ShingleSets.similarity

    def counted(self, record, others):
        pairs.extend((record, other) for other in others.tolist())
        return similarity(self, record, others)

    monkeypatch.setattr(ShingleSets, "similarity", counted)
    return pairs


def test_a_bucket_of_alike_records_costs_one_verification_per_record(monkeypatch):
    pairs = verified_pairs(monkeypatch)
    texts = [f"{STORY} {n}" for n in range(300)]  # all pairs 18/20 = 0.9 and one bucket
    assert cluster(texts).cluster.tolist() == [0] * 300
    # Each record is checked about once: 299 to 2 * 299 of the 44,850 pairs, not all.
    assert {record for record, _ in pairs} == set(range(1, 300)) and len(pairs) < 2 * 299


def test_a_pair_that_shares_several_bands_is_verified_once(monkeypatch):
    pairs = verified_pairs(monkeypatch)
    template = [f"w{i}" for i in range(40)]
    # One word replaced at positions 3 apart: every pair shares 32 of 44 shingles (0.727), below 0.8,
    # and shares about 0.727**4 of the bands.
    texts = [" ".join([*template[:p], "slot", *template[p + 1 :]]) for p in range(2, 38, 3)]
    assert cluster(texts).cluster.tolist() == list(range(12))
    assert len(pairs) == 66 and len(set(pairs)) == 66  # 323 if verified in each band they share


def test_both_maths_records_are_kept(tmp_path, tiny_models, chatml):
    rows = [conversation(text, "Check by substituting x back.") for text in MATHS]
    rows += [conversation("[1, 2]", "Noted."), conversation("[12]", "Noted.")]
    rows += [
        conversation("Solve for x:  x + 5 = 0 → x = -5", "Check by substituting x back.")
    ]  # spacing only
    data = {"val_ratio": 0.0, "test_ratio": 0.0}
    config = load_config(
        write_run_file(tmp_path, tiny_models["chatml"], [write_jsonl(tmp_path / "d.jsonl", rows)], data=data)
    )
    prepare(config, chatml)
    folder = tmp_path / "runs" / "tiny" / "data"
    assert [row["messages"][0]["content"] for row in read_rows(folder / "train.jsonl")] == [
        *MATHS,
        "[1, 2]",
        "[12]",
    ]
    assert [(row["kind"], row["reason"]) for row in read_rows(folder / "rejected.jsonl")] == [
        ("duplicate", f"same normalised text as {tmp_path / 'd.jsonl'}:1")
    ]
