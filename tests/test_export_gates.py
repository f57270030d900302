"""Export's gates: one for every GGUF type, with defaults from llama.cpp's published losses and overrides
from the run file, and failures that name their likely cause (issue 13, fault 5)."""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llamatailor.config import GGUF_TYPES, ModelSection
from llamatailor.errors import CheckFailed
from llamatailor.export.gates import (
    CHAT_STOP,
    LORA_EFFECT,
    LORA_GREEDY,
    LORA_LOGITS,
    MERGE_GREEDY,
    MERGE_LOGITS,
    MERGE_RELOAD,
    MERGE_SAVED,
    METADATA,
    PERPLEXITY,
    TOKENIZER,
    failed,
    lora_gates,
    merge_gates,
)
from llamatailor.export.gguf_check import FileCheck, apply_gates, check_metadata, divergence_start
from llamatailor.export.gguf_file import write_gguf
from llamatailor.export.gguf_gates import DEFAULT_GATES_PCT, gate_for
from llamatailor.export.gguf_lora import LoraCheck, lora_failures
from llamatailor.export.merge import MergeResult, check_merge
from llamatailor.export.rope import GgufRope, check_gguf_rope
from llamatailor.models.loading import load_saved_tokenizer
from llamatailor.ui.reports import gguf_gates


def test_every_type_has_a_default_gate_from_llama_cpps_numbers():
    assert set(DEFAULT_GATES_PCT) == set(GGUF_TYPES)
    # 1 % + 4 x llama.cpp's Llama-3-8B loss: q4_k_m +0.1754 on 6.2316 is 2.81 %, so 1 + 11.26
    assert DEFAULT_GATES_PCT["q4_k_m"] == 12.3 and DEFAULT_GATES_PCT["q8_0"] == 1.2
    ordered = [DEFAULT_GATES_PCT[t] for t in ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k")]
    assert ordered == sorted(ordered), "fewer bits, looser gate"
    assert gate_for("q4_k_m", {"q4_k_m": 3.0}) == 3.0 and gate_for("q4_k_m", {"q8_0": 1.0}) == 12.3


def test_divergence_after_a_position_is_found_and_noise_is_not():
    positions = np.arange(100)
    late = positions < 60
    assert divergence_start(positions, late) == 60
    shuffled = np.random.default_rng(0).permutation(100)
    assert divergence_start(positions[shuffled], late[shuffled]) == 60  # any order
    assert divergence_start(positions, np.ones(100, bool)) is None
    scattered = np.ones(100, bool)
    scattered[::7] = False  # disagreement everywhere: a quantization loss, not a position
    assert divergence_start(positions, scattered) is None


def failing(**measured) -> FileCheck:
    result = FileCheck("q4_k_m", "m.gguf", 1.0, perplexity=2.0, perplexity_merged=1.0)
    result.perplexity_increase_pct = 100.0
    result.chat_finish_reason = "stop"
    for name, value in measured.items():
        setattr(result, name, value)
    return result


def test_failed_gates_name_the_likely_cause():
    tokenizer = failing(tokenizer_mismatches=2, tokenizer_texts=5, first_mismatch="'x  1'")
    apply_gates(tokenizer, 11.8, 2)
    assert "the gate allows 11.8%" in tokenizer.failures[1] and "token ids differ" in tokenizer.failures[1]
    rope = failing(
        metadata_problems=["rope: llama.rope.scaling.type is None, the merged model's config needs 'linear'"]
    )
    apply_gates(rope, 11.8, 2)
    assert "likely cause: RoPE metadata: rope: llama.rope.scaling.type" in rope.failures[-1]
    late = failing(diverges_from=4096)
    apply_gates(late, 11.8, 2)
    assert "agree up to position 4096 and diverge after it" in late.failures[-1]
    plain = failing()
    apply_gates(plain, 11.8, 2)
    assert "likely cause" not in plain.failures[-1]
    within = failing(perplexity_increase_pct=1.0)
    apply_gates(within, 11.8, 2)
    assert within.failures == []


def test_an_answer_that_does_not_stop_names_why():
    missing = failing(perplexity_increase_pct=0.0, chat_finish_reason="length")
    missing.metadata_problems = ["tokenizer.ggml.eot_token_id is None, expected the end-of-turn id 2"]
    apply_gates(missing, 0.5, 2)
    assert "the end-of-turn token is missing from the file's metadata" in missing.failures[-1]
    untrained = failing(perplexity_increase_pct=0.0, chat_finish_reason="length", merged_stop_share=0.25)
    apply_gates(untrained, 0.5, 2)
    assert "the merged model itself stopped on 25% of the test prompts" in untrained.failures[-1]


def test_rope_metadata_is_checked_against_the_merged_config(tiny_models, tmp_path):
    folder = tiny_models["chatml"]
    chat = load_saved_tokenizer(folder, ModelSection())
    path = write_gguf(folder, tmp_path / "m.gguf", "f32", chat, "m")
    written = check_gguf_rope(folder)
    assert check_metadata(path, chat, written) == []
    linear = GgufRope("linear", written.freq_base, scaling="linear", factor=4.0)
    problems = check_metadata(path, chat, linear)
    assert problems == [
        "rope: llama.rope.scaling.factor is None, the merged model's config needs 4.0",
        "rope: llama.rope.scaling.type is None, the merged model's config needs 'linear'",
    ]


def test_a_bf16_merge_may_move_no_more_than_the_adapter_on_a_bf16_base():
    def merged(
        saved: float, rounding: float | None, dtype: str = "bfloat16", reload: float = 1e-6
    ) -> MergeResult:
        return MergeResult(Path("merged"), "adapter", dtype, 1e-5, saved, reload, 8, 8, 1e-3, rounding)

    check_merge(merged(0.016, 0.026))  # the rsLoRA cell of the fidelity matrix: within 1e-3 + 4 x 0.026
    check_merge(merged(0.015, 0.0058))  # LoRA then DPO: within 1e-3 + 4 x 0.0058
    with pytest.raises(CheckFailed, match=r"differs by 1\.10e-01 after reloading; allowed 1\.05e-01"):
        check_merge(merged(0.11, 0.026))
    with pytest.raises(CheckFailed, match=r"differs by 2\.00e-03"):
        check_merge(merged(0.002, None, "float32"))  # fp32: the tolerance alone
    # Whatever rounding allows, merged/ must reload to the very weights it was saved from.
    with pytest.raises(CheckFailed, match=r"reloaded differs by 5\.00e-03 from the merged model"):
        check_merge(merged(0.016, 0.026, reload=5e-3))


@pytest.mark.parametrize("increase", [float("nan"), float("inf")])
def test_a_perplexity_increase_that_is_not_finite_fails_the_gate(increase):
    broken = failing(perplexity=increase, perplexity_increase_pct=increase, diverges_from=12)
    apply_gates(broken, 11.8, 2)
    assert broken.failures == [
        f"perplexity {increase:.4f} against the merged model's 1.0000 is no finite increase ({increase}%): a "
        "log-probability is not finite; the gate allows 11.8% (top-1 agreement 0.000); likely cause: the logits "
        "agree up to position 12 and diverge after it: the file's RoPE scaling or context metadata differs "
        "from the model's"
    ]


def as_recorded(result: FileCheck | LoraCheck | MergeResult) -> dict[str, Any]:
    """A check's fields as the report files hold them, read back (NaN included, as json writes it)."""
    return json.loads(json.dumps(asdict(result), default=str))


# Each failure message's opening -> the gate the UI shows failing for it.
FILE_FAILURES = {
    "metadata:": METADATA,
    "tokenizer:": TOKENIZER,
    "perplexity": PERPLEXITY,
    "the chat": CHAT_STOP,
}
LORA_FAILURES = {"the base GGUF": LORA_LOGITS, "the adapter moves": LORA_EFFECT, "greedy": LORA_GREEDY}
MERGE_FAILURES = {"max |logit|": MERGE_LOGITS, "the saved folder": MERGE_SAVED, "merged/ reloaded": MERGE_RELOAD,
                  "greedy": MERGE_GREEDY}  # fmt: skip


def failing_gates(messages: list[str], openings: dict[str, str]) -> set[str]:
    return {gate for message in messages for opening, gate in openings.items() if message.startswith(opening)}


@pytest.mark.parametrize(
    ("measured", "expected"),
    [
        ({"perplexity_increase_pct": 11.8}, set()),  # at the gate: passes
        ({"perplexity_increase_pct": 11.9}, {PERPLEXITY}),
        ({"perplexity_increase_pct": float("nan")}, {PERPLEXITY}),
        ({"metadata_problems": ["general.architecture is None"]}, {METADATA}),
        ({"tokenizer_mismatches": 1, "tokenizer_texts": 4}, {TOKENIZER}),
        ({"chat_finish_reason": "length"}, {CHAT_STOP}),
        ({"chat_finish_reason": "", "perplexity_increase_pct": 50.0}, {CHAT_STOP, PERPLEXITY}),
    ],
)
def test_the_export_pages_file_gates_fail_where_the_export_does(measured, expected):
    check = failing(**({"perplexity_increase_pct": 0.0} | measured))
    apply_gates(check, 11.8, 2)
    assert failing_gates(check.failures, FILE_FAILURES) == expected
    assert failed(gguf_gates(as_recorded(check), {})) == expected
    assert failed(gguf_gates({**as_recorded(check), "gate_pct": None}, {"q4_k_m": 11.8})) == expected


def lora_check(**measured) -> LoraCheck:
    fields = {"max_abs_logit_diff": 1e-3, "adapter_max_abs_logit_diff": 0.5, "greedy_identical": 6} | measured
    return LoraCheck("b.gguf", "a.gguf", 1.0, 0.1, 16.0, base_max_abs_logit_diff=1e-4, tolerance=2e-3,
                     greedy_compared=6, **fields)  # fmt: skip


@pytest.mark.parametrize(
    ("measured", "expected"),
    [
        ({}, set()),
        ({"greedy_identical": 5, "greedy_near_ties": 1}, set()),  # a near-tie is forgiven
        ({"max_abs_logit_diff": 3e-3}, {LORA_LOGITS}),
        ({"max_abs_logit_diff": float("nan")}, {LORA_LOGITS}),
        ({"adapter_max_abs_logit_diff": 2e-3}, {LORA_EFFECT}),  # at the tolerance: not applied
        ({"adapter_max_abs_logit_diff": float("nan")}, {LORA_EFFECT}),
        ({"greedy_identical": 4, "greedy_near_ties": 1}, {LORA_GREEDY}),
    ],
)
def test_the_export_pages_lora_gates_fail_where_the_export_does(measured, expected):
    check = lora_check(**measured)
    failures = lora_failures(check)
    assert failing_gates(failures, LORA_FAILURES) == expected and len(failures) == len(expected)
    assert failed(lora_gates(as_recorded(check))) == expected
    if LORA_GREEDY in expected:
        assert "on 1 of 6 prompts" in failures[0]
    if measured.get("adapter_max_abs_logit_diff") == 2e-3:
        assert failures == [
            "the adapter moves llama.cpp's logits by only 2.00e-03, within the tolerance 2.00e-03: it was not "
            "applied, or it does nothing"
        ]


@pytest.mark.parametrize(
    ("measured", "expected"),
    [
        ({}, set()),
        ({"max_abs_logit_diff": 2e-3}, {MERGE_LOGITS}),
        ({"saved_max_abs_logit_diff": 0.106}, {MERGE_SAVED}),  # over 1e-3 + 4 x 0.026
        ({"saved_max_abs_logit_diff": float("inf")}, {MERGE_SAVED}),
        ({"reload_max_abs_logit_diff": float("nan")}, {MERGE_RELOAD}),
        ({"greedy_identical": 7}, {MERGE_GREEDY}),
    ],
)
def test_the_export_pages_merge_gates_fail_where_the_export_does(measured, expected):
    fields = {"max_abs_logit_diff": 1e-5, "saved_max_abs_logit_diff": 0.1, "reload_max_abs_logit_diff": 1e-6,
              "greedy_identical": 8} | measured  # fmt: skip
    result = MergeResult(Path("merged"), "adapter", "bfloat16", greedy_compared=8, tolerance=1e-3,
                         rounding_max_abs_logit_diff=0.026, **fields)  # fmt: skip
    try:
        check_merge(result)
        problems = []
    except CheckFailed as exc:
        problems = str(exc).split(": the merged model is not the adapter model: ", 1)[1].split("; ")
    assert failing_gates(problems, MERGE_FAILURES) == expected
    assert failed(merge_gates(as_recorded(result))) == expected
