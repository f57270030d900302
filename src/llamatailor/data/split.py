"""Seeded splits that keep near-duplicates together and, optionally, each stratum's share.

Records are split as groups (a near-duplicate cluster, see `dedup.py`, is one group), so no pair of
records whose word 3-gram Jaccard reaches the threshold lands in two splits. Within each stratum the
groups are shuffled with the seed and the first ones fill test, then val, up to the ratios' record
counts; the rest is train. Same inputs and seed, same split.
"""

from enum import IntEnum

import numpy as np

from llamatailor.vocabulary import SPLITS, Split


class SplitCode(IntEnum):
    """A split as the per-record arrays store it: its position in `vocabulary.SPLITS`."""

    TRAIN = 0
    VAL = 1
    TEST = 2

    @property
    def label(self) -> Split:
        """The split's name in files and reports: "train", "val" or "test"."""
        return SPLITS[self]

    @classmethod
    def of(cls, label: str) -> "SplitCode":
        """The code of a split name; ValueError for a name not in `SPLITS`."""
        return cls(SPLITS.index(label))


def split_counts(total: int, val_ratio: float, test_ratio: float) -> tuple[int, int]:
    """Records for (val, test): at least one each when its ratio is positive and records allow it."""

    def take(ratio: float) -> int:
        return 0 if ratio <= 0 or total < 3 else max(1, round(total * ratio))

    return take(val_ratio), take(test_ratio)


def split_groups(
    group_of: np.ndarray, stratum_of: np.ndarray, val_ratio: float, test_ratio: float, seed: int
) -> np.ndarray:
    """`SplitCode` per record (int8); `group_of` and `stratum_of` are ids per record."""
    codes = np.full(len(group_of), SplitCode.TRAIN, dtype=np.int8)
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
        codes[in_stratum[np.isin(group_of[in_stratum], test_groups)]] = SplitCode.TEST
        codes[in_stratum[np.isin(group_of[in_stratum], val_groups)]] = SplitCode.VAL
    return codes
