"""`data/report.json` and `data/report.md`: what came in, what went out, and why each record did not."""

from dataclasses import asdict
from typing import Any

import numpy as np

from llamatailor.config import RunConfig
from llamatailor.data.records import AcceptedRecords, Decision, Decisions, SampleKind, ScanTally
from llamatailor.data.split import SplitCode
from llamatailor.models.loading import ChatTokenizer
from llamatailor.vocabulary import SPLITS

REMOVALS = tuple(decision for decision in Decision if decision != Decision.KEPT)


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {"count": 0}
    return {
        "count": len(lengths),
        "min": int(lengths.min()),
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95, method="nearest")),
        "max": int(lengths.max()),
        "total": int(lengths.sum()),
    }


def build_report(
    config: RunConfig,
    chat: ChatTokenizer,
    tally: ScanTally,
    records: AcceptedRecords,
    decisions: Decisions,
) -> dict[str, Any]:
    """The report as `data/report.json` holds it: inputs, records read and rejected per input split and
    kind of rejection, what the checks changed, deduplication, and per sample kind and output split the
    samples, their token length statistics and truncations (and strata when data.stratify_by is set)."""
    data = config.data
    removed = {
        decision.label: count
        for decision in REMOVALS
        if (count := int(np.sum(decisions.decision == decision)))
    }

    def per_split(kind: SampleKind, value: Any) -> dict[str, Any]:
        return {split.label: value(decisions.written(records, kind, split)) for split in SplitCode}

    report: dict[str, Any] = {
        "inputs": [asdict(counts) for counts in tally.files],
        "read": {split: tally.read[split] for split in SPLITS},
        "rejected": _rejected(tally, records, decisions),
        "cleaned": dict(sorted(tally.checks.cleaned.items())),
        "pii": {
            "mode": data.pii.mode,
            "records": dict(sorted(tally.checks.pii_records.items())),
            "findings": dict(sorted(tally.checks.pii_findings.items())),
        },
        "kept_by_policy": {"empty": tally.checks.kept_empty, "too_short": tally.checks.kept_short},
        "dedup": {
            "exact": data.dedup.exact,
            "near": data.dedup.near,
            "threshold": data.dedup.threshold,
            "removed": dict(sorted(removed.items())),
        },
        "splits": {kind.label: per_split(kind, lambda mask: int(mask.sum())) for kind in SampleKind},
        "tokens": {
            kind.label: per_split(kind, lambda mask: length_stats(records.tokens[mask]))
            for kind in SampleKind
        },
        "truncated": {
            kind.label: per_split(kind, lambda mask: int(records.truncated[mask].sum()))
            for kind in SampleKind
        },
        "max_seq_len": data.max_seq_len,
        "family": chat.family.name,
        "chat_template": chat.template_origin,
    }
    if data.stratify_by is not None:
        report["strata"] = _strata(records, decisions, data.stratify_by)
    return report


def _rejected(tally: ScanTally, records: AcceptedRecords, decisions: Decisions) -> dict[str, dict[str, int]]:
    """Records rejected per input split and kind: the scan's, by kind name, then the decide pass's."""
    rejected: dict[str, dict[str, int]] = {
        split: dict(sorted(tally.rejected[split].items())) for split in SPLITS
    }
    for decision in REMOVALS:
        for input_split in SplitCode:
            count = int(np.sum((decisions.decision == decision) & (records.input_split == input_split)))
            if count:
                rejected[input_split.label][decision.label] = count
    return rejected


def _strata(records: AcceptedRecords, decisions: Decisions, field: str) -> dict[str, Any]:
    """Kept records per output split and stratum (of both sample kinds)."""
    counts: dict[str, dict[str, int]] = {}
    for split in SplitCode:
        chosen = decisions.kept & (decisions.split == split)
        values, sizes = np.unique(records.stratum[chosen], return_counts=True)
        counts[split.label] = {records.strata[v]: int(n) for v, n in zip(values, sizes, strict=True)}
    return {"field": field, "counts": counts}


def render_report_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Data report",
        "",
        "## Inputs",
        "",
        "| input | split | format | accepted | rejected |",
        "|---|---|---|---:|---:|",
    ]
    lines += [
        f"| {f['input']} | {f['split']} | {f['format']} | {f['accepted']} | {f['rejected']} |"
        for f in report["inputs"]
    ]
    lines += [
        "",
        "## Rejected, by input split and reason",
        "",
        "| split | reason | records |",
        "|---|---|---:|",
    ]
    for split, reasons in report["rejected"].items():
        lines += [f"| {split} | {reason} | {count} |" for reason, count in reasons.items()]
    lines += ["", "## Output", "", "| kind | split | samples | tokens min | median | p95 | max | truncated |"]
    lines += ["|---|---|---:|---:|---:|---:|---:|---:|"]
    for kind, splits in report["tokens"].items():
        for split, stats in splits.items():
            if stats["count"]:
                cells = " | ".join(str(stats[key]) for key in ("min", "median", "p95", "max"))
                lines.append(
                    f"| {kind} | {split} | {stats['count']} | {cells} | {report['truncated'][kind][split]} |"
                )
    lines += ["", "## Checks", ""]
    lines.append(f"- cleaning changed: {_pairs(report['cleaned'])}")
    pii = report["pii"]
    lines.append(
        f"- PII ({pii['mode']}): records {_pairs(pii['records'])}; findings {_pairs(pii['findings'])}"
    )
    dedup = report["dedup"]
    lines.append(
        f"- deduplication (exact {dedup['exact']}, near {dedup['near']} at {dedup['threshold']}): removed {_pairs(dedup['removed'])}"
    )
    lines.append(f"- kept by policy: {_pairs(report['kept_by_policy'])}")
    lines.append(
        f"- template: {report['chat_template']} ({report['family']}), max_seq_len {report['max_seq_len']}"
    )
    if "strata" in report:
        lines += ["", f"## Strata of `{report['strata']['field']}`", ""]
        lines += [f"- {split}: {_pairs(counts)}" for split, counts in report["strata"]["counts"].items()]
    return "\n".join(lines) + "\n"


def _pairs(counts: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in counts.items()) or "none"
