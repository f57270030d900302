"""One record through the checks: parse, system prompt, clean, empty, PII, render, length policies.

`scan_record` returns either an accepted sample with what the later passes need (token counts, the text
to deduplicate on), or a rejection saying which check refused it and why. Counters record what each
check changed, for the report. A record that calls tools when the chat template cannot render them stops
the scan (DataError naming its file and line): every such record would fail alike.
"""

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from llamatailor.config import DataSection
from llamatailor.data.clean import clean_text
from llamatailor.data.formats import Format, RecordError, Sample, to_sample, with_system_prompt
from llamatailor.data.pii import find_pii, mask_pii
from llamatailor.data.reader import RawRecord
from llamatailor.data.templating import RenderError, ToolsNotRendered, render_for_training
from llamatailor.errors import DataError
from llamatailor.models.loading import ChatTokenizer

MISSING_STRATUM = "(missing)"


@dataclass(frozen=True)
class Accepted:
    sample: Sample
    tokens: int  # rendered length before truncation (the longer answer, for preference pairs)
    truncated: bool
    dedup_text: str
    stratum: str


@dataclass(frozen=True)
class Rejected:
    kind: str
    field: str
    reason: str
    record: Any


@dataclass
class ScanCounts:
    cleaned: Counter[str] = field(default_factory=Counter)  # records changed, per cleaning step
    pii_records: Counter[str] = field(default_factory=Counter)  # records with a finding, per PII kind
    pii_findings: Counter[str] = field(default_factory=Counter)  # findings, per PII kind
    kept_empty: int = 0
    kept_short: int = 0


def scan_record(
    raw: RawRecord, fmt: Format, data: DataSection, chat: ChatTokenizer, counts: ScanCounts
) -> Accepted | Rejected:
    if raw.error is not None:
        return Rejected(raw.error.kind, raw.error.field, raw.error.reason, raw.raw)
    try:
        sample = to_sample(raw.value, fmt)
        sample = replace(sample, messages=with_system_prompt(sample.messages, data.system_prompt))
        sample = _cleaned(sample, data, counts)
        sample = _pii_checked(sample, data, counts)
        stratum = _stratum(raw.value, data.stratify_by)
        meta = {name: raw.value[name] for name in data.meta_fields if name in raw.value}
        if data.stratify_by is not None:
            meta[data.stratify_by] = stratum
        if meta:
            sample = replace(sample, meta=meta)
        return _rendered(sample, data, chat, counts, stratum)
    except RecordError as exc:
        return Rejected(exc.kind, exc.field, exc.reason, raw.value)
    except ToolsNotRendered as exc:  # every tool-calling record would fail alike: stop at the first
        raise DataError(f"{raw.where}: {exc}") from None
    except RenderError as exc:
        return Rejected(exc.kind, "", str(exc), raw.value)


def _cleaned(sample: Sample, data: DataSection, counts: ScanCounts) -> Sample:
    steps: set[str] = set()

    def clean(text: str) -> str:
        cleaned, changed = clean_text(text, data.clean)
        steps.update(changed)
        return cleaned

    sample = sample.map_texts(clean)
    counts.cleaned.update(steps)
    empty = next((name for name, text in sample.texts() if not text), None)
    if empty is not None:
        if data.policy.empty == "drop":
            raise RecordError(empty, "empty after cleaning (data.policy.empty is drop)", "empty")
        counts.kept_empty += 1
    return sample


def _pii_checked(sample: Sample, data: DataSection, counts: ScanCounts) -> Sample:
    kinds, regions = set(data.pii.kinds), tuple(data.pii.phone_regions)
    # Tool-call arguments too: an address or a number often sits in a call (send_email's `to`).
    found = {name: find_pii(text, kinds, regions) for name, text in sample.texts(arguments=True)}
    found_kinds = sorted({finding.kind for findings in found.values() for finding in findings})
    if not found_kinds:
        return sample
    counts.pii_records.update(found_kinds)
    counts.pii_findings.update(finding.kind for findings in found.values() for finding in findings)
    if data.pii.mode == "drop":
        where = next(name for name, findings in found.items() if findings)
        raise RecordError(where, f"contains {', '.join(found_kinds)} (data.pii.mode is drop)", "pii")
    if data.pii.mode == "mask":
        return sample.map_texts(lambda text: mask_pii(text, find_pii(text, kinds, regions)), arguments=True)
    return sample


def _rendered(
    sample: Sample, data: DataSection, chat: ChatTokenizer, counts: ScanCounts, stratum: str
) -> Accepted:
    rendered = [
        render_for_training(chat, messages, data.max_seq_len, sample.tools)
        for messages in sample.conversations()
    ]
    longest = max(r.full_length for r in rendered)
    if longest > data.max_seq_len and data.policy.too_long == "drop":
        reason = f"{longest} tokens; data.max_seq_len is {data.max_seq_len} (data.policy.too_long is drop)"
        raise RecordError("", reason, "too_long")
    stops = set(chat.stop_ids)
    shortest_answer = min(sum(1 for label in r.labels if label >= 0 and label not in stops) for r in rendered)
    if shortest_answer < data.min_answer_tokens:
        if data.policy.too_short == "drop":
            reason = f"answer of {shortest_answer} tokens; data.min_answer_tokens is {data.min_answer_tokens}"
            raise RecordError("", reason, "too_short")
        counts.kept_short += 1
    texts = sample.texts(arguments=True)
    dedup_text = "\n".join(text for name, text in texts if not _is_system(sample, name))
    return Accepted(sample, longest, any(r.truncated for r in rendered), dedup_text, stratum)


def _is_system(sample: Sample, name: str) -> bool:
    return name == "messages[0].content" and sample.messages[0]["role"] == "system"


def _stratum(record: Any, stratify_by: str | None) -> str:
    if stratify_by is None:
        return ""
    value = record.get(stratify_by) if isinstance(record, dict) else None
    return MISSING_STRATUM if value is None else str(value)
