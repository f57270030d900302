"""Seeded splits by group and stratum: deterministic, complete, sized by the ratios, groups never cut."""

import numpy as np

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
