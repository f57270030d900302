"""The `prepare` stage: inputs -> checked canonical samples, deduplicated, split without leakage, reported.

Records are streamed through three passes so that memory stays flat with the data size:
1. scan: each record is read, parsed, cleaned, PII-checked and rendered (see `scan.py`); accepted
   samples go to a spool file and their word 3-gram hashes to a second one, and only compact facts
   (kind, token count, hashes, MinHash signature, spool offset: `records.AcceptedRecords`) stay in
   memory; rejected records go straight to `rejected.jsonl`.
2. decide: exact and near-duplicate clusters (candidates verified against the spooled 3-grams, see
   `dedup.py`), leaks (a val/test input record in a cluster with a train record), and the seeded split
   of the records drawn from the train inputs, cluster by cluster.
3. write: the spool is copied line by line into the split files.
Bad records never stop the stage: each is kept in `data/rejected.jsonl` with file, line, field, reason.
Every input is found and its format detected before anything is loaded or written (`check_inputs`). Every
line written (splits, rejections) is strict JSON: no bare NaN or Infinity, which Python's json would write
and strict readers refuse.
"""

import contextlib
import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

import numpy as np

from llamatailor.config import DataFile, RunConfig
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
from llamatailor.data.records import (
    AcceptedRecords,
    AcceptedRecordsBuilder,
    Decision,
    Decisions,
    InputCounts,
    SampleKind,
    ScanTally,
)
from llamatailor.data.report import build_report, render_report_markdown
from llamatailor.data.scan import Accepted, Rejected, scan_record
from llamatailor.data.split import SplitCode, split_groups
from llamatailor.models.loading import ChatTokenizer, load_tokenizer
from llamatailor.plots import plot_lengths
from llamatailor.rundir import RunDir, atomic_path, write_json, write_text
from llamatailor.stage_contract import Progress, Stage, chat_template_file, no_progress
from llamatailor.vocabulary import SPLITS

SHOWN_REJECTIONS = 5
PROGRESS_EVERY = 1000
REASONS = {  # why the decide pass removed a record, as rejected.jsonl says it
    Decision.DUPLICATE: "same normalised text as {other}",
    Decision.NEAR_DUPLICATE: (
        "near-duplicate of {other}: word 3-gram Jaccard {shared}/{union} = {similarity:.3f} >= {threshold}"
    ),
    Decision.LEAK: "a near-duplicate of train record {other}: kept out of {split} to avoid leakage",
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


@dataclass(frozen=True)
class Spool:
    """The scan pass's two spool files: accepted samples as JSON lines, and each one's shingle hashes
    (uint64, native byte order) end to end, found again through `AcceptedRecords.shingle_ends`."""

    samples: IO[str]
    shingles: IO[bytes]

    def write(self, line: str, shingles: np.ndarray) -> None:
        self.samples.write(line)
        self.shingles.write(shingles.tobytes())


def prepare(
    config: RunConfig, chat: ChatTokenizer | None = None, progress: Progress | None = None
) -> PrepareResult:
    """Read every input of `config.data`, clean, check, deduplicate, find PII, split leak-free, and write the
    run's data/ files: the SFT and preference splits (JSON lines, one conversation or pair per line, byte for
    byte in input order), rejected.jsonl (each rejected record with its file, line and reason) and the data
    report (JSON, Markdown, length histogram).

    Three passes keep memory flat in the record count: a scan that spools accepted samples and their
    MinHash shingles to disk (`scan_inputs`), a decision pass over compact typed columns (duplicates exact
    and near, MinHash LSH as datasketch does; split by conversation group so no near-duplicate crosses
    splits), and a write pass streaming the spool to its split files.

    Args:
        config: The run file; reads `seed`, `model` (the tokenizer, for lengths) and `data`.
        chat: The tokenizer and chat template, when the caller has it loaded (else loaded from `model`).
        progress: Told the phase ("scanning", "deduplicating", "writing") and the records done (no total).

    Returns:
        PrepareResult: samples per split, rejections by kind, the first few "file:line: field: reason"
        lines, the number of samples truncated to `data.max_seq_len` tokens, and the report.

    Raises:
        DataError: an input missing, empty, unsupported or of no known format (before any work); or a
            record that the run's settings cannot handle at all (named by file and line, `scan.scan_record`).
        EncodingError: an input that is not UTF-8 text.
        ModelLoadError: the tokenizer cannot be loaded.
    """
    say = progress or no_progress
    inputs = check_inputs(config)  # a missing or unreadable input stops the stage before any work
    chat = chat or load_tokenizer(config.model)
    run = config.run_dir
    run.data.mkdir(parents=True, exist_ok=True)
    builder, tally = AcceptedRecordsBuilder(config.data.dedup.num_perm), ScanTally()
    spool, shingle_spool = run.data / ".spool.jsonl", run.data / ".spool.shingles"
    try:
        with atomic_path(run.rejected) as rejected_tmp, rejected_tmp.open("w", encoding="utf-8") as rejected:
            with spool.open("w", encoding="utf-8") as lines, shingle_spool.open("wb") as hashes:
                scan_inputs(config, inputs, chat, builder, tally, Spool(lines, hashes), rejected, say)
            records = builder.finish()
            with shingle_spool.open("rb") as hashes:
                shingles = ShingleSets.in_file(hashes, records.shingle_ends)
                say("deduplicating", len(records))
                decisions = decide(records, shingles, config)
                say("writing", len(records))
                reason = rejection_reason(spool, records, decisions, shingles, config.data.dedup.threshold)
                write_splits(run, spool, records, decisions, reason, rejected, tally)
    finally:
        spool.unlink(missing_ok=True)
        shingle_spool.unlink(missing_ok=True)
    report = build_report(config, chat, tally, records, decisions)
    write_json(run.data_report, report)
    write_text(run.data / "report.md", render_report_markdown(report))
    plot_lengths(_lengths(records, decisions), run.data / "lengths.png")
    return _result(report, tally)


def _result(report: dict[str, Any], tally: ScanTally) -> PrepareResult:
    """The stage's result, read from its report; the rejections are the scan's and the decide pass's."""
    rejected_by_kind = Counter({kind: count for c in tally.rejected.values() for kind, count in c.items()})
    rejected_by_kind.update(report["dedup"]["removed"])
    return PrepareResult(
        splits=report["splits"][SampleKind.SFT.label],
        preference_splits=report["splits"][SampleKind.PREFERENCE.label],
        rejected=sum(rejected_by_kind.values()),
        rejected_by_kind=dict(sorted(rejected_by_kind.items())),
        first_rejections=tally.first_rejections,
        truncated=sum(sum(per_split.values()) for per_split in report["truncated"].values()),
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


STAGE = Stage(
    "prepare",
    config_keys=("seed", "model", "data"),
    inputs=lambda config: [
        *(source.path for _, source in config.data.inputs() if source.path is not None),
        *chat_template_file(config),
    ],
    outputs=lambda config: [
        *(config.run_dir.split(name) for name in SPLITS),
        config.run_dir.rejected,
        config.run_dir.data_report,
        # the preference splits, where the data held preference records: the dpo stage reads them
        *(path for name in SPLITS if (path := config.run_dir.preference_split(name)).is_file()),
    ],
    action=prepare,
    precheck=check_inputs,
    remote_inputs=lambda config: any(source.hub for _, source in config.data.inputs()),
    activity="reading",
)


def scan_inputs(
    config: RunConfig,
    inputs: list[tuple[str, DataFile, Format]],
    chat: ChatTokenizer,
    records: AcceptedRecordsBuilder,
    tally: ScanTally,
    spool: "Spool",
    rejected: IO[str],
    progress: Progress,
) -> None:
    """Each record of `inputs` (as `check_inputs` gives them) scanned: accepted samples to `records` and
    `spool`, rejections to `rejected`, counts to `tally`."""
    data = config.data
    hasher = MinHasher(data.dedup.num_perm, seed=config.seed)
    for input_split, source, fmt in inputs:
        split = SplitCode.of(input_split)
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
            records.add(outcome, split, exact_key(normalized), hasher.signature(shingles), len(shingles))
            spool.write(line, shingles)
        tally.files.append(InputCounts(source.label, input_split, fmt.name, accepted, rejected_count))


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


def decide(records: AcceptedRecords, shingles: ShingleSets, config: RunConfig) -> Decisions:
    """Per record: its near-duplicate cluster, its `Decision`, the record it repeats (-1 if none): the
    earliest copy for a duplicate, the most similar record it was verified against for a near-duplicate,
    the cluster's train record for a leak; and its output split (`assign_splits`). Reading order makes
    train inputs' records the earliest of their clusters."""
    dedup = config.data.dedup
    kind = records.kind.astype(np.uint64)
    _, first_index, inverse = np.unique(
        np.stack([records.exact, kind]), axis=1, return_index=True, return_inverse=True
    )
    earliest = first_index[inverse.ravel()]
    near_duplicates = near_duplicate_clusters(
        records.signatures, records.kind, earliest, shingles, dedup.threshold
    )
    clusters = near_duplicates.cluster
    position = np.arange(len(clusters))
    from_train = records.input_split[clusters] == SplitCode.TRAIN
    leak = (clusters != position) & from_train & (records.input_split != SplitCode.TRAIN)
    duplicate = ~leak & dedup.exact & (earliest != position)
    near = ~leak & ~duplicate & dedup.near & (clusters != position)
    decision = np.full(len(clusters), Decision.KEPT, dtype=np.int8)
    repeats = np.full(len(clusters), -1, dtype=np.int64)
    for mask, code, repeated in (
        (leak, Decision.LEAK, clusters),
        (duplicate, Decision.DUPLICATE, earliest),
        (near, Decision.NEAR_DUPLICATE, near_duplicates.partner),
    ):
        decision[mask], repeats[mask] = code, repeated[mask]
    split = assign_splits(records, clusters, decision, config)
    return Decisions(cluster=clusters, decision=decision, repeats=repeats, split=split)


def assign_splits(
    records: AcceptedRecords, clusters: np.ndarray, decision: np.ndarray, config: RunConfig
) -> np.ndarray:
    """`SplitCode` per record (int8): explicit val/test inputs keep theirs; train inputs' kept records
    are split by cluster, each sample kind apart."""
    data = config.data
    split = records.input_split.copy()
    for kind in SampleKind:
        drawn = np.flatnonzero(
            (records.kind == kind) & (records.input_split == SplitCode.TRAIN) & (decision == Decision.KEPT)
        )
        split[drawn] = split_groups(
            clusters[drawn],
            records.stratum[drawn],
            val_ratio=0.0 if data.val else data.val_ratio,
            test_ratio=0.0 if data.test else data.test_ratio,
            seed=config.seed,
        )
    return split


def write_splits(
    run: RunDir,
    spool: Path,
    records: AcceptedRecords,
    decisions: Decisions,
    reason: Callable[[int], str],
    rejected: IO[str],
    tally: ScanTally,
) -> None:
    """Copies the spool's kept lines into the split files and writes each removed record to `rejected`
    with `reason(record)`. The preference files are written only when there are preference inputs."""
    has_preference = bool(np.any(records.kind == SampleKind.PREFERENCE)) or any(
        counts.format == "preference" for counts in tally.files
    )
    kinds = list(SampleKind) if has_preference else [SampleKind.SFT]
    targets = {(kind, split): _split_file(run, kind, split) for kind in kinds for split in SplitCode}
    # Python ints, not numpy scalars, meet the enums below: numpy compares its scalars with an enum member
    # ~50 times slower, seconds over a million records.
    kept, kind, split = decisions.kept, records.kind, decisions.split
    with contextlib.ExitStack() as stack, spool.open(encoding="utf-8") as lines:
        outputs: dict[tuple[int, int], TextIO] = {
            key: stack.enter_context(stack.enter_context(atomic_path(path)).open("w", encoding="utf-8"))
            for key, path in targets.items()
        }
        for i, line in enumerate(lines):
            if kept[i]:
                outputs[(int(kind[i]), int(split[i]))].write(line)
                continue
            row = json.loads(line)
            label = Decision(int(decisions.decision[i])).label
            _write_rejection(rejected, tally, row["source"], Rejected(label, "", reason(i), row))


def _split_file(run: RunDir, kind: SampleKind, split: SplitCode) -> Path:
    return run.preference_split(split.label) if kind == SampleKind.PREFERENCE else run.split(split.label)


def rejection_reason(
    spool: Path, records: AcceptedRecords, decisions: Decisions, shingles: ShingleSets, threshold: float
) -> Callable[[int], str]:
    """`reason(record)`: why a removed record went, naming the record it repeats by its source (read
    from the spool first: a near-duplicate's most similar record may come after it) and, for a
    near-duplicate, their exact word 3-gram Jaccard, computed again from the shingle spool."""
    repeats = decisions.repeats
    needed = set(repeats[repeats >= 0].tolist())
    with spool.open(encoding="utf-8") as lines:
        sources = {i: json.loads(line)["source"] for i, line in enumerate(lines) if i in needed}

    def reason(i: int) -> str:
        decision, other = Decision(int(decisions.decision[i])), int(repeats[i])
        near = decision == Decision.NEAR_DUPLICATE
        shared, union = overlap(shingles.of(i), shingles.of(other)) if near else (0, 1)
        return REASONS[decision].format(
            other=sources[other],
            threshold=threshold,
            split=SplitCode(int(records.input_split[i])).label,
            shared=shared,
            union=union,
            similarity=shared / union,
        )

    return reason


def _lengths(records: AcceptedRecords, decisions: Decisions) -> dict[str, list[int]]:
    """Token lengths of the written samples per plot label: the split's name for SFT samples, the kind's
    and the split's for the others ("preference val")."""
    lengths = {}
    for kind in SampleKind:
        for split in SplitCode:
            chosen = decisions.written(records, kind, split)
            if np.any(chosen):
                label = split.label if kind == SampleKind.SFT else f"{kind.label} {split.label}"
                lengths[label] = records.tokens[chosen].tolist()
    return lengths
