"""What the `prepare` stage's passes know about the records, with names and types.

The scan pass keeps, per accepted record, a few facts the decide pass needs (`AcceptedRecords`); the decide
pass concludes, per record, whether it is kept and in which split (`Decisions`); the scan's counts go to
the report (`ScanTally`). Per-record facts are held column by column in numpy arrays of small integers,
not as one object per record: about 300 bytes a record with 64 MinHash permutations, most of it the
signature, where objects would cost kilobytes. The enums name the integers those arrays hold.
"""

import array
from collections import Counter
from dataclasses import dataclass, field
from enum import IntEnum
from typing import get_args

import numpy as np

from llamatailor.data.formats import Kind
from llamatailor.data.scan import Accepted, ScanCounts
from llamatailor.data.split import SplitCode
from llamatailor.vocabulary import SPLITS


class SampleKind(IntEnum):
    """A sample's kind (`formats.Kind`) as the per-record arrays store it: its position in that type."""

    SFT = 0  # a conversation, for supervised fine-tuning
    PREFERENCE = 1  # a prompt with a chosen and a rejected answer, for DPO

    @property
    def label(self) -> Kind:
        """The kind's name in samples, files and reports: "sft" or "preference"."""
        return get_args(Kind)[self]

    @classmethod
    def of(cls, label: Kind) -> "SampleKind":
        """The code of a kind name; ValueError for a name that is not a `formats.Kind`."""
        return cls(get_args(Kind).index(label))


class Decision(IntEnum):
    """What the decide pass concluded about an accepted record. Every decision but KEPT sends the record
    to `rejected.jsonl`, with `label` as its rejection kind."""

    KEPT = 0
    DUPLICATE = 1  # the same normalised text as an earlier record of its kind
    NEAR_DUPLICATE = 2  # word 3-gram Jaccard at or above the threshold with a record of its kind
    LEAK = 3  # from a val or test input, in one cluster with a train input's record

    @property
    def label(self) -> str:
        """The decision's name: "kept", "duplicate", "near_duplicate" or "leak"."""
        return self.name.lower()


@dataclass(frozen=True)
class AcceptedRecords:
    """Per accepted record, in reading order, what the decide pass and the report need (no text: the
    samples wait in the scan's spool). Each field holds one value per record, except `strata`."""

    kind: np.ndarray  # int8 SampleKind
    input_split: np.ndarray  # int8 SplitCode of the input the record was read from
    exact: np.ndarray  # uint64 hash of the normalised text (`dedup.exact_key`)
    tokens: np.ndarray  # int64 rendered length before truncation (the longer answer, for a pair)
    truncated: np.ndarray  # bool: cut to data.max_seq_len
    stratum: np.ndarray  # int64 position of the record's stratum in `strata`
    signatures: np.ndarray  # uint32 (records, num_perm) MinHash signature of the word 3-grams
    shingle_ends: np.ndarray  # uint64 end of the record's 3-gram hashes in the shingle spool, in hashes
    strata: tuple[str, ...]  # each stratum's value of data.stratify_by ("" when not stratified)

    def __len__(self) -> int:
        return len(self.kind)


@dataclass
class AcceptedRecordsBuilder:
    """`AcceptedRecords` grown one record at a time during the scan, in arrays of machine values (a
    Python list would hold a 28-byte object per value)."""

    num_perm: int
    kind: array.array = field(default_factory=lambda: array.array("b"))
    input_split: array.array = field(default_factory=lambda: array.array("b"))
    exact: array.array = field(default_factory=lambda: array.array("Q"))
    tokens: array.array = field(default_factory=lambda: array.array("q"))
    truncated: array.array = field(default_factory=lambda: array.array("b"))
    stratum: array.array = field(default_factory=lambda: array.array("q"))
    signatures: array.array = field(default_factory=lambda: array.array("I"))
    shingle_ends: array.array = field(default_factory=lambda: array.array("Q"))
    strata: dict[str, int] = field(default_factory=dict)  # stratum value -> its position

    def add(
        self,
        accepted: Accepted,
        input_split: SplitCode,
        exact: int,
        signature: np.ndarray,
        shingle_count: int,
    ) -> None:
        """One accepted record's facts, as `AcceptedRecords` names them; `exact`: its `dedup.exact_key`,
        `signature`: its uint32 MinHash values, `shingle_count`: how many 3-gram hashes it added to the
        shingle spool."""
        self.kind.append(SampleKind.of(accepted.sample.kind))
        self.input_split.append(input_split)
        self.exact.append(exact)
        self.tokens.append(accepted.tokens)
        self.truncated.append(accepted.truncated)
        self.stratum.append(self.strata.setdefault(accepted.stratum, len(self.strata)))
        self.signatures.frombytes(signature.tobytes())
        self.shingle_ends.append((self.shingle_ends[-1] if self.shingle_ends else 0) + shingle_count)

    def finish(self) -> AcceptedRecords:
        """The records as numpy arrays over this builder's memory (only `truncated` is copied, as bool);
        while they live, `add` raises BufferError."""
        return AcceptedRecords(
            kind=np.frombuffer(self.kind, dtype=np.int8),
            input_split=np.frombuffer(self.input_split, dtype=np.int8),
            exact=np.frombuffer(self.exact, dtype=np.uint64),
            tokens=np.frombuffer(self.tokens, dtype=np.int64),
            truncated=np.frombuffer(self.truncated, dtype=np.int8).astype(bool),
            stratum=np.frombuffer(self.stratum, dtype=np.int64),
            signatures=np.frombuffer(self.signatures, dtype=np.uint32).reshape(-1, self.num_perm),
            shingle_ends=np.frombuffer(self.shingle_ends, dtype=np.uint64),
            strata=tuple(self.strata),
        )


@dataclass(frozen=True)
class Decisions:
    """The decide pass's conclusions, one value per accepted record in `AcceptedRecords` order."""

    cluster: np.ndarray  # int64 near-duplicate cluster, named by its earliest record
    decision: np.ndarray  # int8 Decision
    repeats: np.ndarray  # int64 record a removed one repeats (see `prepare.decide`), -1 if kept
    split: np.ndarray  # int8 SplitCode the record is written to (its input's split if not kept)

    @property
    def kept(self) -> np.ndarray:
        """Bool per record: the decision is KEPT."""
        return self.decision == Decision.KEPT

    def written(self, records: AcceptedRecords, kind: SampleKind, split: SplitCode) -> np.ndarray:
        """Bool per record: kept, of `kind`, and written to `split`."""
        return (records.kind == kind) & self.kept & (self.split == split)


@dataclass(frozen=True)
class InputCounts:
    """One input's line in the report: its label, split, detected format and records accepted and
    rejected by the scan (duplicates are counted apart, by the decide pass)."""

    input: str
    split: str
    format: str
    accepted: int
    rejected: int


@dataclass
class ScanTally:
    """Counts from the scan pass: records read and rejected (by rejection kind) per input split name, each
    input's counts, what the checks changed, and the first rejections as people read them."""

    read: Counter[str] = field(default_factory=Counter)
    rejected: dict[str, Counter[str]] = field(default_factory=lambda: {split: Counter() for split in SPLITS})
    files: list[InputCounts] = field(default_factory=list)
    checks: ScanCounts = field(default_factory=ScanCounts)
    first_rejections: list[str] = field(default_factory=list)  # "file:line: field: reason"
