"""Seeded splits: deterministic, disjoint, complete, sized by the ratios."""

from llamatailor.data.split import split_counts, split_records


def test_split_is_deterministic_disjoint_and_complete():
    records = list(range(100))
    first = split_records(records, 0.1, 0.2, seed=1)
    assert first == split_records(records, 0.1, 0.2, seed=1)
    assert (len(first["train"]), len(first["val"]), len(first["test"])) == (70, 10, 20)
    assert sorted(first["train"] + first["val"] + first["test"]) == records
    assert first != split_records(records, 0.1, 0.2, seed=2)
    assert first["train"] == sorted(first["train"])  # input order is kept within a split


def test_small_sets_still_get_a_val_and_test_record():
    assert split_counts(5, 0.1, 0.1) == (1, 1)
    assert split_counts(2, 0.1, 0.1) == (0, 0)
    assert split_counts(50, 0.0, 0.1) == (0, 5)
