"""Seeded splits by group and stratum: deterministic, complete, sized by the ratios, groups never cut;
and, through `prepare`, no pair at or above the near-duplicate threshold across splits."""

import itertools
import random
import re

import numpy as np

from helpers import conversation, read_rows, write_jsonl, write_run_file
from llamatailor.config import load_config
from llamatailor.data.prepare import prepare
from llamatailor.data.split import split_counts, split_groups


def test_singletons_split_exactly_by_ratio_and_deterministically():
    groups, strata = np.arange(100), np.zeros(100, dtype=np.int64)
    codes = split_groups(groups, strata, 0.1, 0.2, seed=1)
    assert np.bincount(codes, minlength=3).tolist() == [70, 10, 20]
    assert np.array_equal(codes, split_groups(groups, strata, 0.1, 0.2, seed=1))
    assert not np.array_equal(codes, split_groups(groups, strata, 0.1, 0.2, seed=2))


def test_groups_stay_in_one_split():
    groups = np.repeat(np.arange(30), 3)  # 30 clusters of 3 near-duplicates
    codes = split_groups(groups, np.zeros(90, dtype=np.int64), 0.1, 0.1, seed=3)
    for group in range(30):
        assert len(set(codes[groups == group].tolist())) == 1
    assert np.bincount(codes, minlength=3).tolist() == [72, 9, 9]


def test_each_stratum_keeps_its_share():
    strata = np.array([0] * 80 + [1] * 20)
    codes = split_groups(np.arange(100), strata, 0.0, 0.25, seed=0)
    assert int(np.sum((strata == 0) & (codes == 2))) == 20
    assert int(np.sum((strata == 1) & (codes == 2))) == 5
    assert int(np.sum(codes == 1)) == 0


def test_small_sets_still_get_a_val_and_test_record():
    assert split_counts(5, 0.1, 0.1) == (1, 1)
    assert split_counts(2, 0.1, 0.1) == (0, 0)
    assert split_counts(50, 0.0, 0.1) == (0, 5)


# Records built to sit at the threshold: families of 50-64 words from a small vocabulary, each member
# its family's text with one or two words replaced. Pairs in a family: true word 3-gram Jaccard of
# 0.70-0.92, most of them 0.78-0.86; pairs across families: near 0.
WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu apple river stone cloud green light "
    "market window garden paper silver engine bottle orange planet summer winter autumn spring forest ocean "
    "desert island bridge castle tower valley mountain meadow candle mirror pocket ladder basket hammer"
).split()
THRESHOLD = 0.8


def near_threshold_texts(families: int, members: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(families):
        base = rng.choices(WORDS, k=rng.randint(50, 64))
        for _ in range(members):
            words = list(base)
            for _ in range(rng.choice((1, 1, 2))):
                words[rng.randrange(len(words))] = rng.choice(WORDS)
            texts.append(" ".join(words))
    return texts


def true_jaccard(texts: list[str]) -> dict[tuple[int, int], float]:
    """Every pair's Jaccard by brute force, independent of the package: sets of word 3-gram tuples."""
    sets = [{tuple(w[i : i + 3]) for i in range(len(w) - 2)} for w in (text.split() for text in texts)]
    return {
        (i, j): len(sets[i] & sets[j]) / len(sets[i] | sets[j])
        for i, j in itertools.combinations(range(len(texts)), 2)
    }


def prepare_texts(folder, model, chat, texts, **dedup):
    rows = [conversation(" ".join(t.split()[:10]), " ".join(t.split()[10:])) for t in texts]
    data = {"val_ratio": 0.2, "test_ratio": 0.2, "max_seq_len": 512, "dedup": dedup}
    config = load_config(write_run_file(folder, model, [write_jsonl(folder / "d.jsonl", rows)], data=data))
    prepare(config, chat)
    return folder / "runs" / "tiny" / "data"


def text_of(row):
    return " ".join(m["content"] for m in row["messages"])


def test_no_pair_at_or_above_the_threshold_crosses_splits(tmp_path, tiny_models, chatml):
    texts = near_threshold_texts(families=40, members=6, seed=0)
    similarity = true_jaccard(texts)
    values = np.array(list(similarity.values()))
    # The set sits at the threshold: many true pairs on each side of it (an estimate's σ is ~0.05).
    assert np.sum((values >= 0.78) & (values < THRESHOLD)) == 84
    assert np.sum((values >= THRESHOLD) & (values < 0.85)) == 173
    folder = prepare_texts(tmp_path, tiny_models["chatml"], chatml, texts, exact=False, near=False)
    split_of = {
        text_of(row): name for name in ("train", "val", "test") for row in read_rows(folder / f"{name}.jsonl")
    }
    assert len(split_of) == 240 and set(split_of.values()) == {"train", "val", "test"}
    crossing = [
        (round(s, 3), split_of[texts[i]], split_of[texts[j]])
        for (i, j), s in similarity.items()
        if s >= THRESHOLD and split_of[texts[i]] != split_of[texts[j]]
    ]
    assert crossing == []


def test_near_duplicates_are_exactly_the_pairs_at_or_above_the_threshold(tmp_path, tiny_models, chatml):
    """Both ways: a record is removed if and only if the true Jaccard graph joins it to an earlier one,
    and each removal names a record whose true Jaccard with it is >= the threshold."""
    texts = near_threshold_texts(families=40, members=6, seed=1)
    similarity = true_jaccard(texts)
    parent = list(range(len(texts)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for (i, j), value in similarity.items():
        if value >= THRESHOLD:
            a, b = root(i), root(j)
            parent[max(a, b)] = min(a, b)
    expected_kept = sorted(i for i in range(len(texts)) if root(i) == i)
    folder = prepare_texts(tmp_path, tiny_models["chatml"], chatml, texts, exact=False)
    line = {text: n for n, text in enumerate(texts)}
    kept = sorted(
        line[text_of(row)] for name in ("train", "val", "test") for row in read_rows(folder / f"{name}.jsonl")
    )
    assert kept == expected_kept
    removed = read_rows(folder / "rejected.jsonl")
    assert len(removed) == len(texts) - len(kept) > 60
    source = str(folder.parent.parent.parent / "d.jsonl")
    for row in removed:
        partner = re.search(
            rf"near-duplicate of {re.escape(source)}:(\d+): word 3-gram Jaccard (\d+)/(\d+)", row["reason"]
        )
        pair = tuple(sorted((line[text_of(row["record"])], int(partner[1]) - 1)))
        assert similarity[pair] >= THRESHOLD and similarity[pair] == int(partner[2]) / int(partner[3])
