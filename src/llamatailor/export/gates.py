"""The pass/fail rules of the export checks, in one place: each GGUF file's gates, the LoRA GGUF's and the
merge's, read from the recorded fields (a FileCheck, LoraCheck or MergeResult as `dataclasses.asdict` gives
it, or as export_report.json and merge_report.json hold it). The export stage writes its failure messages
from these verdicts; the UI shows them. Torch-free, so the UI can import it.

A measured value passes only when it is a finite number: a NaN or infinite perplexity or |Δlogit| fails
its gate, as does a missing one.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

# Rounding the merged weights and rounding the base under the adapter are both rounding, by chance larger or
# smaller: over the fidelity matrix's bf16 merges (2026-11-30) the saved model moved 0.6 to 1.0 times the
# yardstick. A wrong merge moves logits by the adapter's whole effect, tens of times more.
ROUNDING_FACTOR = 4.0

# The gates of one GGUF file (export.gguf_check.apply_gates).
METADATA = "metadata problems"
TOKENIZER = "tokenizer mismatches"
PERPLEXITY = "perplexity increase vs merged"
CHAT_STOP = "chat finish reason"
# The LoRA GGUF on its base GGUF (export.gguf_lora.lora_failures).
LORA_LOGITS = "max |Δlogit|, base GGUF + adapter vs adapter model"
LORA_EFFECT = "max |Δlogit| the adapter makes in llama.cpp"
LORA_GREEDY = "greedy answers differing (not at a near-tie)"
# The merge (export.merge.check_merge).
MERGE_LOGITS = "max |Δlogit|, merged vs adapter model"
MERGE_SAVED = "max |Δlogit|, saved folder reloaded"
MERGE_RELOAD = "max |Δlogit|, reload vs rounded merge"
MERGE_GREEDY = "greedy answers differing"


@dataclass(frozen=True)
class Gate:
    """One check of an export gate: the measured `value`, what it must be (`allowed`: "≤", "=", ">", read
    with `limit`), `passed`, and a `detail` (what was counted, the problems found)."""

    name: str
    value: Any
    allowed: str
    limit: Any
    passed: bool
    unit: str = ""
    detail: str = ""


def failed(gates: list[Gate]) -> set[str]:
    """The names of the gates that fail."""
    return {gate.name for gate in gates if not gate.passed}


def rounded_tolerance(tolerance: float, yardstick: float | None) -> float:
    """What a rounded model may differ by (max |Δlogit|, logits' units): `tolerance` plus ROUNDING_FACTOR x
    what rounding alone costs (`yardstick`; None when nothing was rounded). The merge's saved folder and the
    LoRA GGUF on its base GGUF follow it."""
    return tolerance + ROUNDING_FACTOR * (yardstick or 0.0)


def file_gates(check: Mapping[str, Any], gate_pct: Any) -> list[Gate]:
    """The gates of one GGUF file, from its FileCheck fields: no metadata problem, no tokenizer mismatch, a
    perplexity increase over the merged model (percent) of at most `gate_pct` (gguf_gates.gate_for) and a
    finite one, and a chat answer that ended with finish reason "stop"."""
    problems = [str(problem) for problem in check.get("metadata_problems") or []]
    mismatches = check.get("tokenizer_mismatches")
    finish = check.get("chat_finish_reason")
    texts, first = check.get("tokenizer_texts"), check.get("first_mismatch")
    return [
        Gate(METADATA, len(problems), "=", 0, not problems, detail="; ".join(problems)),
        Gate(
            TOKENIZER,
            mismatches,
            "=",
            0,
            _number(mismatches) and mismatches == 0,
            detail=f"of {texts} texts" + (f"; first: {first}" if first else ""),
        ),
        _at_most(PERPLEXITY, check.get("perplexity_increase_pct"), gate_pct, unit="%"),
        Gate(CHAT_STOP, finish, "=", "stop", finish == "stop"),
    ]


def lora_gates(lora: Mapping[str, Any]) -> list[Gate]:
    """The gates of the LoRA GGUF on its base GGUF, from its LoraCheck fields, against the recorded
    tolerance (max |Δlogit|, logits' units): base + adapter within it of the adapter model, the adapter's
    own effect in llama.cpp beyond it (else it was not applied), and no greedy answer differing from the
    adapter model's other than at a near-tie."""
    tolerance = lora.get("tolerance")
    return [
        _at_most(LORA_LOGITS, lora.get("max_abs_logit_diff"), tolerance),
        _beyond(LORA_EFFECT, lora.get("adapter_max_abs_logit_diff"), tolerance),
        _none_differ(LORA_GREEDY, lora, lora.get("greedy_near_ties")),
    ]


def merge_gates(merge: Mapping[str, Any]) -> list[Gate]:
    """The merge's gates, from its MergeResult fields (max |Δlogit|, logits' units): the in-memory merge
    within `tolerance` of the adapter model, the saved folder reloaded within rounded_tolerance, the reload
    within `tolerance` of the rounded in-memory merge (left out for a record without it), identical greedy
    answers."""
    tolerance, rounding = merge.get("tolerance"), merge.get("rounding_max_abs_logit_diff")
    saved = (
        rounded_tolerance(tolerance, rounding) if _number(tolerance) and _number_or_none(rounding) else None
    )
    gates = [
        _at_most(MERGE_LOGITS, merge.get("max_abs_logit_diff"), tolerance),
        _at_most(MERGE_SAVED, merge.get("saved_max_abs_logit_diff"), saved),
    ]
    if merge.get("reload_max_abs_logit_diff") is not None:
        gates.append(_at_most(MERGE_RELOAD, merge.get("reload_max_abs_logit_diff"), tolerance))
    return [*gates, _none_differ(MERGE_GREEDY, merge, 0)]


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number_or_none(value: Any) -> bool:
    return value is None or _number(value)


def _finite(value: Any) -> TypeGuard[float]:
    return _number(value) and math.isfinite(value)


def _at_most(name: str, value: Any, limit: Any, unit: str = "") -> Gate:
    passed = _finite(value) and _number(limit) and value <= limit
    return Gate(name, value, "≤", limit, passed, unit)


def _beyond(name: str, value: Any, limit: Any) -> Gate:
    passed = _finite(value) and _number(limit) and value > limit
    return Gate(name, value, ">", limit, passed)


def _none_differ(name: str, counts: Mapping[str, Any], near_ties: Any) -> Gate:
    """Greedy answers compared, less those identical and the `near_ties` forgiven, must be 0."""
    compared, identical = counts.get("greedy_compared"), counts.get("greedy_identical")
    if not (_number(compared) and _number(identical) and _number(near_ties)):
        return Gate(name, None, "=", 0, False)
    differ = compared - identical - near_ties
    return Gate(name, differ, "=", 0, differ == 0, detail=f"{identical} of {compared} identical")
