"""Exact and near-duplicate detection that fits a million records in a few hundred megabytes.

Texts are compared after `normalize`, which folds only what does not change meaning: Unicode
compatibility forms (NFKC: full-width digits, ligatures), each whitespace run to one space, and, when
asked (`dedup.fold_case`), letter case. Signs, operators, brackets, digits and punctuation stay, so
`x + 5 = 0` and `x - 5 = 0`, or `[1, 2]` and `[12]`, are different texts.

Exact duplicates share the 64-bit hash (xxh64) of their normalised text. Near duplicates are pairs whose
exact Jaccard similarity of word 3-gram sets is at or above the threshold; words are the normalised
text's whitespace-separated tokens, punctuation attached. Candidates come from MinHash (datasketch)
with locality-sensitive hashing (Broder 1997; Leskovec, Rajaraman and Ullman, "Mining of Massive
Datasets", ch. 3): the signature is cut into bands of 4 values and records that agree on a whole band
share a bucket. Every pair in a bucket that is not yet in one cluster is then verified with the exact
Jaccard of the two records' shingle-hash sets, so a pair is joined if and only if it reaches the
threshold. The only approximation left is LSH recall: a pair at similarity s shares no band with
probability (1 - s^4)^bands, 2.2e-4 at s = 0.8 with 64 permutations (16 bands), 4e-8 at s = 0.9.

Memory: per record a signature and one offset stay in memory; the shingle hashes live in a spool file
and are read back only for the candidates.
"""

import os
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import xxhash
from datasketch import MinHash

ROWS_PER_BAND = 4
SHINGLE_WORDS = 3
LOW_32_BITS = np.uint64(0xFFFFFFFF)


def normalize(text: str, fold_case: bool) -> str:
    """The text as deduplication compares it: NFKC; when `fold_case`, Unicode case folding
    (`str.casefold`, then NFKC again, since folding can leave a text unnormalised, as in Unicode's
    compatibility caseless matching); each whitespace run one space, none at the ends. Nothing else."""
    text = unicodedata.normalize("NFKC", text)
    if fold_case:
        text = unicodedata.normalize("NFKC", text.casefold())
    return " ".join(text.split())


def exact_key(normalized: str) -> int:
    """64-bit hash (xxh64) of a normalised text: equal keys mean equal texts (collisions ~n²/2^65)."""
    return xxhash.xxh64_intdigest(normalized.encode())


def shingle_hashes(normalized: str) -> np.ndarray:
    """Sorted, distinct xxh64 hashes (uint64) of a normalised text's word 3-grams (space-separated
    tokens); a text of fewer than 3 words is one shingle, the whole text."""
    words = normalized.split(" ")
    width = min(SHINGLE_WORDS, len(words))
    shingles = (" ".join(words[i : i + width]).encode() for i in range(len(words) - width + 1))
    return np.unique(np.fromiter(map(xxhash.xxh64_intdigest, shingles), dtype=np.uint64))


def overlap(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(shared, union): the sizes of the intersection and union of two non-empty sorted arrays of
    distinct hashes; their Jaccard similarity is shared / union."""
    if len(a) > len(b):
        a, b = b, a
    found = np.minimum(np.searchsorted(b, a), len(b) - 1)
    shared = int(np.count_nonzero(b[found] == a))
    return shared, len(a) + len(b) - shared


class MinHasher:
    """MinHash signatures (uint32) of shingle hashes; the permutations are drawn once from the seed."""

    def __init__(self, num_perm: int, seed: int = 1) -> None:
        template = MinHash(num_perm=num_perm, seed=seed, hashfunc=int)
        self.num_perm = num_perm
        self._permutations = template.permutations
        self._scheme = template.scheme

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """Shape (num_perm,): the MinHash of the low 32 bits of `hashes` (see `shingle_hashes`)."""
        minhash = MinHash(
            num_perm=self.num_perm, hashfunc=int, permutations=self._permutations, scheme=self._scheme
        )
        minhash.update_batch((hashes & LOW_32_BITS).tolist())
        return minhash.hashvalues.astype(np.uint32)


@dataclass(frozen=True)
class ShingleSets:
    """Every record's `shingle_hashes` end to end, record i's from ends[i - 1] (0 for the first) to
    ends[i]; `read(start, stop)` returns the hashes between two such positions."""

    read: Callable[[int, int], np.ndarray]
    ends: np.ndarray

    @classmethod
    def in_memory(cls, values: np.ndarray, ends: np.ndarray) -> "ShingleSets":
        return cls(lambda start, stop: values[start:stop], ends)

    @classmethod
    def in_file(cls, handle: BinaryIO, ends: np.ndarray) -> "ShingleSets":
        """Hashes written to `handle`'s file as native uint64, read back one record at a time: only the
        candidates' are read, and none stay in memory (a memory map would keep the pages it touched)."""
        width = np.dtype(np.uint64).itemsize

        def read(start: int, stop: int) -> np.ndarray:
            data = os.pread(handle.fileno(), (stop - start) * width, start * width)
            return np.frombuffer(data, dtype=np.uint64)

        return cls(read, ends)

    def of(self, record: int) -> np.ndarray:
        return self.read(int(self.ends[record - 1]) if record else 0, int(self.ends[record]))

    def sizes(self) -> np.ndarray:
        """Shingles per record (int64)."""
        return np.diff(self.ends.astype(np.int64), prepend=0)

    def similarity(self, record: int, others: np.ndarray) -> np.ndarray:
        """The exact Jaccard similarity (float64) of `record`'s set with each of `others`' (non-empty)."""
        mine = self.of(record)
        theirs = [self.of(other) for other in others.tolist()]
        if len(theirs) == 1:  # the common case, without the set-up of the vectorized one
            common, union = overlap(mine, theirs[0])
            return np.array([common / union])
        owner = np.repeat(np.arange(len(theirs)), [len(hashes) for hashes in theirs])
        shared = np.bincount(owner[np.isin(np.concatenate(theirs), mine)], minlength=len(theirs))
        return shared / (len(mine) + np.array([len(hashes) for hashes in theirs]) - shared)


@dataclass(frozen=True)
class NearDuplicates:
    cluster: np.ndarray  # int64 per record: the index of its cluster's earliest record
    partner: np.ndarray  # int64 per record: the most similar record it was verified against, -1 if none


def band_hash(signatures: np.ndarray, band: int) -> np.ndarray:
    """One band's values folded into one uint64 per record (collisions are verified later). One band at a
    time keeps the temporary arrays small: a million records need 32 MB here, not half a gigabyte."""
    rows = signatures[:, band * ROWS_PER_BAND : (band + 1) * ROWS_PER_BAND].astype(np.uint64)
    folded = np.zeros(len(signatures), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for row in range(ROWS_PER_BAND):
            folded = folded * np.uint64(0x100000001B3) + rows[:, row] + np.uint64(row + 1)
    return folded


def near_duplicate_clusters(
    signatures: np.ndarray,
    groups: np.ndarray,
    same_text_as: np.ndarray,
    shingles: ShingleSets,
    threshold: float,
) -> NearDuplicates:
    """Clusters of records joined by pairs whose exact word 3-gram Jaccard is >= `threshold`.

    `signatures`: (records, num_perm) MinHash values; `groups`: an id per record, only records of the
    same group are compared (e.g. sample kind); `same_text_as`: per record the earliest record of its
    group with the same exact key (itself if none): those are joined first, at similarity 1, and only
    the earliest of them takes part in LSH, which bounds the buckets of repeated texts. Every join is
    verified; a pair that shares no band is never compared (the recall in the module docstring).
    Cost: one check per candidate pair at most, one per record in a bucket of alike records, and one
    per pair in a bucket of records that are alike but below the threshold (templated text).
    """
    records = np.arange(len(signatures))
    forest = _Forest(same_text_as.astype(np.int64))
    copies = np.flatnonzero(same_text_as != records)
    partner = np.full(len(records), -1, dtype=np.int64)
    partner[copies] = same_text_as[copies]
    repeated, first_copy = np.unique(same_text_as[copies], return_index=True)
    partner[repeated] = copies[first_copy]
    best = np.where(partner >= 0, 1.0, 0.0)
    sizes = shingles.sizes()

    def similar(x: int, ys: np.ndarray) -> np.ndarray:
        """Per record of `ys`, whether its exact Jaccard with x reaches the threshold; notes for each
        record the most similar partner found so far."""
        # Jaccard <= smaller / larger set size: pairs too unequal in size need no reading.
        fits = np.minimum(sizes[ys], sizes[x]) >= threshold * np.maximum(sizes[ys], sizes[x])
        similarity = np.zeros(len(ys))
        similarity[fits] = shingles.similarity(x, ys[fits]) if fits.any() else []
        hit = similarity >= threshold
        if hit.any() and similarity.max() > best[x]:
            best[x], partner[x] = similarity.max(), ys[similarity.argmax()]
        better = hit & (similarity > best[ys])
        best[ys[better]], partner[ys[better]] = similarity[better], x
        return hit

    leaders = np.flatnonzero(same_text_as == records)
    for band in range(signatures.shape[1] // ROWS_PER_BAND if len(leaders) else 0):
        keys = np.stack([band_hash(signatures, band)[leaders], groups[leaders].astype(np.uint64)])
        order = np.lexsort(keys)
        same = np.all(keys[:, order[1:]] == keys[:, order[:-1]], axis=0)
        for start, end in _runs(same):
            _join_bucket(np.sort(leaders[order[start : end + 1]]), band, signatures, forest, similar)
    return NearDuplicates(forest.roots(), partner)


def _join_bucket(
    members: np.ndarray,
    band: int,
    signatures: np.ndarray,
    forest: "_Forest",
    similar: Callable[[int, np.ndarray], np.ndarray],
) -> None:
    """Join each member to every cluster of the earlier members that holds a record similar to it. A
    pair that shares an earlier band was settled in that band's bucket and is not verified again."""
    clusters: dict[int, list[int]] = {}  # root -> the bucket's members in that cluster so far
    for position, member in enumerate(members.tolist()):
        own = forest.root(member)
        joined: list[int] = []
        if len(clusters) > (own in clusters):
            unsettled = _first_met_here(members[:position], member, band, signatures)
            candidates = {
                root: [other for other in others if other in unsettled]
                for root, others in clusters.items()
                if root != own
            }
            joined = _similar_clusters(member, {r: c for r, c in candidates.items() if c}, similar)
        merged = [*clusters.pop(own, []), member]
        for root in joined:
            forest.union(member, root)
            merged += clusters.pop(root)
        clusters[forest.root(member)] = merged


def _similar_clusters(
    member: int, candidates: dict[int, list[int]], similar: Callable[[int, np.ndarray], np.ndarray]
) -> list[int]:
    """The clusters (roots) among `candidates` (root -> records to check) that hold a record similar
    to `member`. One record of each is checked first, all in one call; only the clusters that did not
    match are checked further: a bucket of records that are all alike costs one check per record."""
    if not candidates:
        return []
    roots = list(candidates)
    first_hit = similar(member, np.array([records[0] for records in candidates.values()], dtype=np.int64))
    joined = [root for root, hit in zip(roots, first_hit, strict=True) if hit]
    rest = [(root, candidates[root][1:]) for root, hit in zip(roots, first_hit, strict=True) if not hit]
    rest = [(root, records) for root, records in rest if records]
    if rest:
        owner = np.repeat(np.arange(len(rest)), [len(records) for _, records in rest])
        rest_hit = similar(member, np.concatenate([records for _, records in rest]))
        joined += [rest[i][0] for i in np.unique(owner[rest_hit]).tolist()]
    return joined


def _first_met_here(earlier: np.ndarray, member: int, band: int, signatures: np.ndarray) -> set[int]:
    """The records of `earlier` whose first band in common with `member` is `band`."""
    agree = signatures[earlier] == signatures[member]
    first = agree.reshape(len(earlier), -1, ROWS_PER_BAND).all(axis=2).argmax(axis=1)
    return set(earlier[first == band].tolist())


class _Forest:
    """Union-find whose roots are each cluster's earliest record (the smaller root wins a union)."""

    def __init__(self, parent: np.ndarray) -> None:
        self.parent = parent

    def root(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    def union(self, a: int, b: int) -> None:
        a, b = self.root(a), self.root(b)
        self.parent[max(a, b)] = min(a, b)

    def roots(self) -> np.ndarray:
        """Every record's root, by pointer jumping over the whole array at once."""
        parent = self.parent.copy()
        while not np.array_equal(parent[parent], parent):
            parent = parent[parent]
        return parent


def _runs(same: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) in sorted order of each run of equal keys: positions start..end share one key."""
    edges = np.diff(np.concatenate(([0], same.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))
