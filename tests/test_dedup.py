"""Exact keys, MinHash similarity and near-duplicate clusters."""

import numpy as np

from llamatailor.data.dedup import MinHasher, exact_key, near_duplicate_clusters

STORY = "the quick brown fox jumps over the lazy dog by the river bank at dawn while birds sing softly"


def test_exact_key_ignores_case_punctuation_and_spacing():
    assert exact_key("Hello,   World!") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello word")


def test_signatures_estimate_jaccard():
    hasher = MinHasher(128, seed=1)
    same = hasher.signature(STORY)
    assert np.array_equal(same, hasher.signature(STORY.upper()))
    one_word = np.mean(same == hasher.signature(STORY.replace("dawn", "dusk")))
    unrelated = np.mean(same == hasher.signature("completely different words about cooking pasta tonight"))
    # True Jaccard of the 3-gram sets: 15 of 19 shared for one changed word; 0 for unrelated text.
    assert 0.6 < one_word < 0.95 and unrelated < 0.1


def test_clusters_join_near_duplicates_of_the_same_group_only():
    hasher = MinHasher(64, seed=1)
    texts = [STORY, "an unrelated sentence about trains and stations", STORY + " today", STORY]
    signatures = np.stack([hasher.signature(t) for t in texts])
    clusters = near_duplicate_clusters(signatures, np.zeros(4, dtype=np.int8), threshold=0.8)
    assert clusters.tolist() == [0, 1, 0, 0]
    by_group = near_duplicate_clusters(signatures, np.array([0, 0, 0, 1], dtype=np.int8), threshold=0.8)
    assert by_group.tolist() == [0, 1, 0, 3]
