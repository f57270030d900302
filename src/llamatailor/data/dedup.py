"""Exact and near-duplicate detection that fits a million records in a few hundred megabytes.

Exact duplicates share the 64-bit hash of their normalised text (NFKC, lower case, words only). Near
duplicates are found with MinHash (datasketch) over word 3-grams and locality-sensitive hashing: the
signature is cut into bands of 4 values; records that agree on a whole band are candidates, and a
candidate pair counts when the signatures' estimated Jaccard similarity reaches the threshold. Pairs are
joined into clusters (union-find), so that a whole cluster can be kept together or reduced to one record.
Only compact arrays are kept per record: the signatures, not the text.
"""

import re
import unicodedata

import numpy as np
import xxhash
from datasketch import MinHash

ROWS_PER_BAND = 4
SHINGLE_WORDS = 3
WORD = re.compile(r"\w+")


def normalized_words(text: str) -> list[str]:
    return WORD.findall(unicodedata.normalize("NFKC", text).lower())


def exact_key(text: str) -> int:
    return xxhash.xxh64_intdigest(" ".join(normalized_words(text)).encode())


class MinHasher:
    """MinHash signatures (uint32) of word 3-grams; the permutations are drawn once from the seed."""

    def __init__(self, num_perm: int, seed: int = 1) -> None:
        template = MinHash(num_perm=num_perm, seed=seed, hashfunc=xxhash.xxh32_intdigest)
        self.num_perm = num_perm
        self._permutations = template.permutations
        self._scheme = template.scheme

    def signature(self, text: str) -> np.ndarray:
        words = normalized_words(text)
        width = min(SHINGLE_WORDS, max(len(words), 1))
        shingles = {" ".join(words[i : i + width]).encode() for i in range(max(len(words) - width + 1, 1))}
        minhash = MinHash(
            num_perm=self.num_perm,
            hashfunc=xxhash.xxh32_intdigest,
            permutations=self._permutations,
            scheme=self._scheme,
        )
        minhash.update_batch(sorted(shingles))
        return minhash.hashvalues.astype(np.uint32)


def band_hash(signatures: np.ndarray, band: int) -> np.ndarray:
    """One band's values folded into one uint64 per record (collisions are verified later). One band at a
    time keeps the temporary arrays small: a million records need 32 MB here, not half a gigabyte."""
    rows = signatures[:, band * ROWS_PER_BAND : (band + 1) * ROWS_PER_BAND].astype(np.uint64)
    folded = np.zeros(len(signatures), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for row in range(ROWS_PER_BAND):
            folded = folded * np.uint64(0x100000001B3) + rows[:, row] + np.uint64(row + 1)
    return folded


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def near_duplicate_clusters(signatures: np.ndarray, groups: np.ndarray, threshold: float) -> np.ndarray:
    """Cluster id per record: the index of the cluster's earliest record. Only records of the same group
    (e.g. sample kind) are compared."""
    parent = np.arange(len(signatures))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    for band in range(signatures.shape[1] // ROWS_PER_BAND if len(signatures) else 0):
        keys = np.stack([band_hash(signatures, band), groups.astype(np.uint64)])
        order = np.lexsort(keys)
        same = np.all(keys[:, order[1:]] == keys[:, order[:-1]], axis=0)
        for start, end in _runs(same):
            members = np.sort(order[start : end + 1])
            first = int(members[0])
            for other in members[1:]:
                if estimated_jaccard(signatures[first], signatures[other]) >= threshold:
                    a, b = root(first), root(int(other))
                    parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(len(signatures))], dtype=np.int64)


def _runs(same: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) in sorted order of each run of equal keys: positions start..end share one key."""
    edges = np.diff(np.concatenate(([0], same.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))
