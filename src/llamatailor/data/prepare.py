"""The `prepare` stage: inputs -> checked canonical samples, deduplicated, split without leakage, reported.

Records are streamed through three passes so that memory stays flat with the data size:
1. scan: each record is read, parsed, cleaned, PII-checked and rendered (see `scan.py`); accepted
   samples go to a spool file and their word 3-gram hashes to a second one, and only compact facts
   (kind, token count, hashes, MinHash signature, spool offset) stay in memory; rejected records go
   straight to `rejected.jsonl`.
2. decide: exact and near-duplicate clusters (candidates verified against the spooled 3-grams, see
   `dedup.py`), leaks (a val/test input record in a cluster with a train record), and the seeded split
   of the records drawn from the train inputs, cluster by cluster.
3. write: the spool is copied line by line into the split files.
Bad records never stop the stage: each is kept in `data/rejected.jsonl` with file, line, field, reason.
Every input is found and its format detected before anything is loaded or written (`check_inputs`). Every
line written (splits, rejections) is strict JSON: no bare NaN or Infinity, which Python's json would write
and strict readers refuse.
"""

import array
import contextlib
import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from llamatailor.config import SPLITS, DataFile, RunConfig
from llamatailor.data.dedup import (
    MinHasher,
    ShingleSets,
    exact_key,
    near_duplicate_clusters,
    normalize,
    overlap,
    shingle_hashes,
)
from llamatailor.data.formats import Format, Sample
from llamatailor.data.reader import RawRecord, detect_file_format, read_source
from llamatailor.data.report import build_report, render_report_markdown
from llamatailor.data.scan import Accepted, Rejected, ScanCounts, scan_record
from llamatailor.data.split import SPLIT_CODES, split_groups
from llamatailor.models.loading import ChatTokenizer, load_tokenizer
from llamatailor.plots import plot_lengths
from llamatailor.rundir import RunDir, atomic_path, write_json, write_text

KINDS = ("sft", "preference")
SHOWN_REJECTIONS = 5
PROGRESS_EVERY = 1000
ProgressCallback = Callable[[str, int], None]
KEPT, DUPLICATE, NEAR_DUPLICATE, LEAK = 0, 1, 2, 3
DECISION_REASONS = {
    DUPLICATE: ("duplicate", "same normalised text as {other}"),
    NEAR_DUPLICATE: (
        "near_duplicate",
        "near-duplicate of {other}: word 3-gram Jaccard {shared}/{union} = {similarity:.3f} >= {threshold}",
    ),
    LEAK: ("leak", "a near-duplicate of train record {other}: kept out of {split} to avoid leakage"),
}


@dataclass(frozen=True)
class PrepareResult:
    splits: dict[str, int]  # SFT samples per split
    preference_splits: dict[str, int]
    rejected: int
    rejected_by_kind: dict[str, int]
    first_rejections: list[str]  # "file:line: field: reason", the first few
    truncated: int
    report: dict[str, Any]


@dataclass
class Index:
    """What the decide pass needs per accepted record, in compact arrays (no text)."""

    hasher: MinHasher
    kind: array.array = field(default_factory=lambda: array.array("b"))
    input_split: array.array = field(default_factory=lambda: array.array("b"))
    exact: array.array = field(default_factory=lambda: array.array("Q"))
    tokens: array.array = field(default_factory=lambda: array.array("l"))
    truncated: array.array = field(default_factory=lambda: array.array("b"))
    stratum: array.array = field(default_factory=lambda: array.array("l"))
    signatures: array.array = field(default_factory=lambda: array.array("I"))
    shingle_ends: array.array = field(default_factory=lambda: array.array("Q"))  # in the shingle spool
    strata: dict[str, int] = field(default_factory=dict)

    def add(self, accepted: Accepted, input_split: str, normalized: str, shingles: np.ndarray) -> None:
        """`normalized`: the dedup text as `dedup.normalize` gives it; `shingles`: its `shingle_hashes`,
        which the caller writes to the shingle spool in the same order."""
        self.kind.append(KINDS.index(accepted.sample.kind))
        self.input_split.append(SPLIT_CODES[input_split])
        self.exact.append(exact_key(normalized))
        self.tokens.append(accepted.tokens)
        self.truncated.append(accepted.truncated)
        self.stratum.append(self.strata.setdefault(accepted.stratum, len(self.strata)))
        self.signatures.frombytes(self.hasher.signature(shingles).tobytes())
        self.shingle_ends.append((self.shingle_ends[-1] if self.shingle_ends else 0) + len(shingles))

    def __len__(self) -> int:
        return len(self.kind)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "kind": np.frombuffer(self.kind, dtype=np.int8),
            "input_split": np.frombuffer(self.input_split, dtype=np.int8),
            "exact": np.frombuffer(self.exact, dtype=np.uint64),
            "tokens": np.frombuffer(self.tokens, dtype=np.int64),
            "truncated": np.frombuffer(self.truncated, dtype=np.int8).astype(bool),
            "stratum": np.frombuffer(self.stratum, dtype=np.int64),
            "signatures": np.frombuffer(self.signatures, dtype=np.uint32).reshape(-1, self.hasher.num_perm),
            "shingle_ends": np.frombuffer(self.shingle_ends, dtype=np.uint64),
        }


@dataclass(frozen=True)
class Spool:
    """The scan pass's two spool files: accepted samples as JSON lines, and each one's shingle hashes
    (uint64, native byte order) end to end, found again through `Index.shingle_ends`."""

    samples: IO[str]
    shingles: IO[bytes]

    def write(self, line: str, shingles: np.ndarray) -> None:
        self.samples.write(line)
        self.shingles.write(shingles.tobytes())


@dataclass
class ScanTally:
    """Counts from the scan pass, per input split."""

    read: Counter[str] = field(default_factory=Counter)
    rejected: dict[str, Counter[str]] = field(default_factory=lambda: {split: Counter() for split in SPLITS})
    files: list[dict[str, Any]] = field(default_factory=list)
    checks: ScanCounts = field(default_factory=ScanCounts)
    first_rejections: list[str] = field(default_factory=list)


def prepare(
    config: RunConfig, chat: ChatTokenizer | None = None, progress: ProgressCallback | None = None
) -> PrepareResult:
    """`progress(phase, records)` is called as work goes on: scanning, deduplicating, writing."""
    progress = progress or (lambda phase, done: None)
    inputs = check_inputs(config)  # a missing or unreadable input stops the stage before any work
    chat = chat or load_tokenizer(config.model)
    run = config.run_dir
    run.data.mkdir(parents=True, exist_ok=True)
    index, tally = Index(MinHasher(config.data.dedup.num_perm, seed=config.seed)), ScanTally()
    spool, shingle_spool = run.data / ".spool.jsonl", run.data / ".spool.shingles"
    try:
        with atomic_path(run.rejected) as rejected_tmp, rejected_tmp.open("w", encoding="utf-8") as rejected:
            with spool.open("w", encoding="utf-8") as lines, shingle_spool.open("wb") as hashes:
                scan_inputs(config, inputs, chat, index, tally, Spool(lines, hashes), rejected, progress)
            facts = index.arrays()
            with shingle_spool.open("rb") as hashes:
                shingles = ShingleSets.in_file(hashes, facts["shingle_ends"])
                progress("deduplicating", len(index))
                clusters, decision, other = decide(facts, shingles, config)
                split_of = assign_splits(facts, clusters, decision, config)
                progress("writing", len(index))
                reason = rejection_reason(
                    spool, facts, decision, other, shingles, config.data.dedup.threshold
                )
                write_splits(run, spool, facts, decision, split_of, reason, rejected, tally)
    finally:
        spool.unlink(missing_ok=True)
        shingle_spool.unlink(missing_ok=True)
    report = build_report(config, chat, tally, facts, decision, split_of, index.strata)
    write_json(run.data_report, report)
    write_text(run.data / "report.md", render_report_markdown(report))
    plot_lengths(_lengths(facts, decision, split_of), run.data / "lengths.png")
    rejected_by_kind = Counter({kind: count for c in tally.rejected.values() for kind, count in c.items()})
    rejected_by_kind.update(report["dedup"]["removed"])
    return PrepareResult(
        splits=report["splits"]["sft"],
        preference_splits=report["splits"]["preference"],
        rejected=sum(rejected_by_kind.values()),
        rejected_by_kind=dict(sorted(rejected_by_kind.items())),
        first_rejections=tally.first_rejections,
        truncated=sum(report["truncated"]["sft"].values()) + sum(report["truncated"]["preference"].values()),
        report=report,
    )


def check_inputs(config: RunConfig) -> list[tuple[str, DataFile, Format]]:
    """`(input split, source, format)` for every input of `config.data`, in reading order.

    Each input is found and its format detected from its first records, so that the long scan starts only
    when all of them can be read. Raises DataError (a file missing, unsupported, empty or of no known
    format) or EncodingError (a text file that is not UTF-8); loads and writes nothing.
    """
    data = config.data
    return [
        (split, source, detect_file_format(source, data.max_record_bytes)) for split, source in data.inputs()
    ]


def scan_inputs(
    config: RunConfig,
    inputs: list[tuple[str, DataFile, Format]],
    chat: ChatTokenizer,
    index: Index,
    tally: ScanTally,
    spool: "Spool",
    rejected: IO[str],
    progress: ProgressCallback,
) -> None:
    """Each record of `inputs` (as `check_inputs` gives them) scanned: accepted samples to `index` and
    `spool`, rejections to `rejected`, counts to `tally`."""
    data = config.data
    for input_split, source, fmt in inputs:
        accepted = rejected_count = 0
        for raw in read_source(source, data.max_record_bytes):
            tally.read[input_split] += 1
            if tally.read.total() % PROGRESS_EVERY == 0:
                progress("scanning", tally.read.total())
            outcome = scan_record(raw, fmt, data, chat, tally.checks)
            line = _sample_line(outcome, raw) if isinstance(outcome, Accepted) else outcome
            if isinstance(line, Rejected):
                rejected_count += 1
                tally.rejected[input_split][line.kind] += 1
                _write_rejection(rejected, tally, raw.where, line)
                continue
            assert isinstance(outcome, Accepted)
            accepted += 1
            normalized = normalize(outcome.dedup_text, data.dedup.fold_case)
            shingles = shingle_hashes(normalized)
            index.add(outcome, input_split, normalized, shingles)
            spool.write(line, shingles)
        tally.files.append(
            {
                "input": source.label,
                "split": input_split,
                "format": fmt.name,
                "accepted": accepted,
                "rejected": rejected_count,
            }
        )


def sample_id(sample: Sample) -> str:
    body = (
        [sample.messages, sample.chosen, sample.rejected] if sample.kind == "preference" else sample.messages
    )
    return hashlib.sha256(json.dumps(body, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def json_line(value: Any) -> str:
    """`value` as one line of strict JSON (RFC 8259), newline included; ValueError for a NaN or an infinity
    (Python's json would write them bare, and strict readers refuse the line), TypeError for a value JSON
    has no type for."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False) + "\n"


def _sample_line(accepted: Accepted, raw: RawRecord) -> "str | Rejected":
    """The accepted sample's line for the split files, or its rejection (`invalid`) when it holds a float
    JSON cannot write: NaN or an infinity, from a Parquet or hub record (JSON inputs are read strictly)."""
    row = accepted.sample.row(sample_id(accepted.sample), raw.where)
    try:
        return json_line(row)
    except ValueError:
        field, value = _non_finite(row)
        return Rejected(
            "invalid", field, f"{value} is not a JSON value (the split files are JSON)", raw.value
        )


def _non_finite(value: Any, where: str = "") -> tuple[str, str]:
    """`(field path, "NaN" | "Infinity" | "-Infinity")` of the first such float in a sample's row; the row's
    top-level `meta` or `tools` is named like any field (`meta.score`, `messages[1].content`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found[1]:
            return found
    return where, ""


def _plain(value: Any) -> Any:
    """`value` with what JSON cannot hold written as text: NaN and infinities as "NaN", "Infinity",
    "-Infinity"; bytes, dates and other Parquet or hub values as Python prints them. For rejected records,
    kept to be read by people."""
    if isinstance(value, float) and not math.isfinite(value):
        return _non_finite(value)[1]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value if value is None or isinstance(value, str | int | float) else str(value)


def _write_rejection(handle: IO[str], tally: ScanTally, where: str, rejection: Rejected) -> None:
    row = {"source": where, "kind": rejection.kind, "field": rejection.field, "reason": rejection.reason}
    try:
        line = json_line({**row, "record": rejection.record})
    except (ValueError, TypeError):  # a Parquet or hub record's NaN, infinity, bytes or timestamp
        line = json_line({**row, "record": _plain(rejection.record)})
    handle.write(line)
    if len(tally.first_rejections) < SHOWN_REJECTIONS:
        field_part = f"{rejection.field}: " if rejection.field else ""
        tally.first_rejections.append(f"{where}: {field_part}{rejection.reason}")


def decide(
    facts: dict[str, np.ndarray], shingles: ShingleSets, config: RunConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per record: its near-duplicate cluster, KEPT / DUPLICATE / NEAR_DUPLICATE / LEAK, and the record it
    repeats (-1 if none): the earliest copy for a duplicate, the most similar record it was verified
    against for a near-duplicate, the cluster's train record for a leak. Reading order makes train
    inputs' records the earliest of their clusters."""
    dedup = config.data.dedup
    kinds = facts["kind"].astype(np.uint64)
    _, first_index, inverse = np.unique(
        np.stack([facts["exact"], kinds]), axis=1, return_index=True, return_inverse=True
    )
    earliest = first_index[inverse.ravel()]
    near_duplicates = near_duplicate_clusters(
        facts["signatures"], facts["kind"], earliest, shingles, dedup.threshold
    )
    clusters = near_duplicates.cluster
    position = np.arange(len(clusters))
    from_train = facts["input_split"][clusters] == 0
    leak = (clusters != position) & from_train & (facts["input_split"] != 0)
    duplicate = ~leak & dedup.exact & (earliest != position)
    near = ~leak & ~duplicate & dedup.near & (clusters != position)
    decision = np.full(len(clusters), KEPT, dtype=np.int8)
    other = np.full(len(clusters), -1, dtype=np.int64)
    for mask, code, repeated in (
        (leak, LEAK, clusters),
        (duplicate, DUPLICATE, earliest),
        (near, NEAR_DUPLICATE, near_duplicates.partner),
    ):
        decision[mask], other[mask] = code, repeated[mask]
    return clusters, decision, other


def assign_splits(
    facts: dict[str, np.ndarray], clusters: np.ndarray, decision: np.ndarray, config: RunConfig
) -> np.ndarray:
    """Split code per record: explicit val/test inputs keep theirs; train inputs are split by cluster."""
    data = config.data
    split_of = facts["input_split"].copy()
    for kind in range(len(KINDS)):
        drawn = np.flatnonzero((facts["kind"] == kind) & (facts["input_split"] == 0) & (decision == KEPT))
        split_of[drawn] = split_groups(
            clusters[drawn],
            facts["stratum"][drawn],
            val_ratio=0.0 if data.val else data.val_ratio,
            test_ratio=0.0 if data.test else data.test_ratio,
            seed=config.seed,
        )
    return split_of


def write_splits(
    run: RunDir,
    spool: Path,
    facts: dict[str, np.ndarray],
    decision: np.ndarray,
    split_of: np.ndarray,
    reason: Callable[[int], str],
    rejected: IO[str],
    tally: ScanTally,
) -> None:
    """Copies the spool's kept lines into the split files and writes each removed record to `rejected`
    with `reason(record)`."""
    has_preference = bool(np.any(facts["kind"] == 1)) or any(f["format"] == "preference" for f in tally.files)
    targets = {(0, name): run.split(name) for name in SPLITS}
    if has_preference:
        targets.update({(1, name): run.preference_split(name) for name in SPLITS})
    with contextlib.ExitStack() as stack, spool.open(encoding="utf-8") as lines:
        outputs = {
            key: stack.enter_context(stack.enter_context(atomic_path(path)).open("w", encoding="utf-8"))
            for key, path in targets.items()
        }
        for i, line in enumerate(lines):
            if decision[i] == KEPT:
                outputs[(int(facts["kind"][i]), SPLITS[split_of[i]])].write(line)
                continue
            row = json.loads(line)
            kind = DECISION_REASONS[int(decision[i])][0]
            _write_rejection(rejected, tally, row["source"], Rejected(kind, "", reason(i), row))


def rejection_reason(
    spool: Path,
    facts: dict[str, np.ndarray],
    decision: np.ndarray,
    other: np.ndarray,
    shingles: ShingleSets,
    threshold: float,
) -> Callable[[int], str]:
    """`reason(record)`: why a removed record went, naming the record it repeats by its source (read
    from the spool first: a near-duplicate's most similar record may come after it) and, for a
    near-duplicate, their exact word 3-gram Jaccard, computed again from the shingle spool."""
    needed = set(other[other >= 0].tolist())
    with spool.open(encoding="utf-8") as lines:
        sources = {i: json.loads(line)["source"] for i, line in enumerate(lines) if i in needed}

    def reason(i: int) -> str:
        code = int(decision[i])
        shared, union = (
            overlap(shingles.of(i), shingles.of(int(other[i]))) if code == NEAR_DUPLICATE else (0, 1)
        )
        return DECISION_REASONS[code][1].format(
            other=sources[int(other[i])],
            threshold=threshold,
            split=SPLITS[facts["input_split"][i]],
            shared=shared,
            union=union,
            similarity=shared / union,
        )

    return reason


def _lengths(
    facts: dict[str, np.ndarray], decision: np.ndarray, split_of: np.ndarray
) -> dict[str, list[int]]:
    lengths = {}
    for kind, kind_name in enumerate(KINDS):
        for code, name in enumerate(SPLITS):
            chosen = (facts["kind"] == kind) & (decision == KEPT) & (split_of == code)
            if np.any(chosen):
                label = name if kind_name == "sft" else f"preference {name}"
                lengths[label] = facts["tokens"][chosen].tolist()
    return lengths
