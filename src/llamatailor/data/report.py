"""`data/report.json` and `data/report.md`: what came in, what went out, and why each record did not."""

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from llamatailor.config import SPLITS, RunConfig
from llamatailor.models.loading import ChatTokenizer

if TYPE_CHECKING:
    from llamatailor.data.prepare import ScanTally

KINDS = ("sft", "preference")
DECISIONS = {1: "duplicate", 2: "near_duplicate", 3: "leak"}


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
    tally: "ScanTally",
    facts: dict[str, np.ndarray],
    decision: np.ndarray,
    split_of: np.ndarray,
    strata: dict[str, int],
) -> dict[str, Any]:
    data = config.data
    kept = decision == 0
    removed = Counter(DECISIONS[int(code)] for code in decision[~kept])
    rejected = {split: dict(sorted(tally.rejected[split].items())) for split in SPLITS}
    for code, name in DECISIONS.items():
        for input_code, split in enumerate(SPLITS):
            count = int(np.sum((decision == code) & (facts["input_split"] == input_code)))
            if count:
                rejected[split][name] = count

    def per_split(kind: int, value: Any) -> dict[str, Any]:
        return {
            name: value((facts["kind"] == kind) & kept & (split_of == code))
            for code, name in enumerate(SPLITS)
        }

    report: dict[str, Any] = {
        "inputs": tally.files,
        "read": {split: tally.read[split] for split in SPLITS},
        "rejected": rejected,
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
        "splits": {kind: per_split(k, lambda mask: int(mask.sum())) for k, kind in enumerate(KINDS)},
        "tokens": {
            kind: per_split(k, lambda mask: length_stats(facts["tokens"][mask]))
            for k, kind in enumerate(KINDS)
        },
        "truncated": {
            kind: per_split(k, lambda mask: int(facts["truncated"][mask].sum()))
            for k, kind in enumerate(KINDS)
        },
        "max_seq_len": data.max_seq_len,
        "family": chat.family.name,
        "chat_template": chat.template_origin,
    }
    if data.stratify_by is not None:
        report["strata"] = _strata(facts, kept, split_of, data.stratify_by, strata)
    return report


def _strata(
    facts: dict[str, np.ndarray], kept: np.ndarray, split_of: np.ndarray, field: str, strata: dict[str, int]
) -> dict[str, Any]:
    names = {index: name for name, index in strata.items()}
    counts: dict[str, dict[str, int]] = {}
    for code, split in enumerate(SPLITS):
        values, sizes = np.unique(facts["stratum"][kept & (split_of == code)], return_counts=True)
        counts[split] = {names[int(v)]: int(n) for v, n in zip(values, sizes, strict=True)}
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
    for kind in KINDS:
        for split in SPLITS:
            stats = report["tokens"][kind][split]
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
