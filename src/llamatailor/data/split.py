"""Seeded train/val/test split: the same records and seed always give the same split."""

import random
from typing import TypeVar

T = TypeVar("T")


def split_counts(total: int, val_ratio: float, test_ratio: float) -> tuple[int, int]:
    """Records for (val, test): at least one each when its ratio is positive and records allow it."""

    def take(ratio: float) -> int:
        return 0 if ratio <= 0 or total < 3 else max(1, round(total * ratio))

    return take(val_ratio), take(test_ratio)


def split_records(records: list[T], val_ratio: float, test_ratio: float, seed: int) -> dict[str, list[T]]:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val, n_test = split_counts(len(records), val_ratio, test_ratio)
    test = sorted(order[:n_test])
    val = sorted(order[n_test : n_test + n_val])
    train = sorted(order[n_test + n_val :])
    return {
        name: [records[i] for i in picked]
        for name, picked in (("train", train), ("val", val), ("test", test))
    }
