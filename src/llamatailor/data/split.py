"""Seeded splits that keep near-duplicates together and, optionally, each stratum's share.

Records are split as groups (a near-duplicate cluster, see `dedup.py`, is one group), so no pair of
records whose word 3-gram Jaccard reaches the threshold lands in two splits. Within each stratum the
groups are shuffled with the seed and the first ones fill test, then val, up to the ratios' record
counts; the rest is train. Same inputs and seed, same split.
"""

import numpy as np

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def split_counts(total: int, val_ratio: float, test_ratio: float) -> tuple[int, int]:
    """Records for (val, test): at least one each when its ratio is positive and records allow it."""

    def take(ratio: float) -> int:
        return 0 if ratio <= 0 or total < 3 else max(1, round(total * ratio))

    return take(val_ratio), take(test_ratio)


def split_groups(
    group_of: np.ndarray, stratum_of: np.ndarray, val_ratio: float, test_ratio: float, seed: int
) -> np.ndarray:
    """Split code (0 train, 1 val, 2 test) per record; `group_of` and `stratum_of` are ids per record."""
    codes = np.zeros(len(group_of), dtype=np.int8)
    for stratum in np.unique(stratum_of):
        in_stratum = np.flatnonzero(stratum_of == stratum)
        groups, sizes = np.unique(group_of[in_stratum], return_counts=True)
        order = np.random.default_rng([seed, int(stratum)]).permutation(len(groups))
        n_val, n_test = split_counts(len(in_stratum), val_ratio, test_ratio)
        filled = np.cumsum(sizes[order])
        test_groups = groups[order[filled - sizes[order] < n_test]]
        val_groups = groups[
            order[(filled - sizes[order] >= n_test) & (filled - sizes[order] < n_test + n_val)]
        ]
        codes[in_stratum[np.isin(group_of[in_stratum], test_groups)]] = SPLIT_CODES["test"]
        codes[in_stratum[np.isin(group_of[in_stratum], val_groups)]] = SPLIT_CODES["val"]
    return codes
