"""Export's gates: one for every GGUF type, with defaults from llama.cpp's published losses and overrides
from the run file, and failures that name their likely cause (issue 13, fault 5)."""

import numpy as np
import pytest

from llamatailor.config import GGUF_TYPES, ModelSection
from llamatailor.export.gguf_check import FileCheck, apply_gates, check_metadata, divergence_start
from llamatailor.export.gguf_file import write_gguf
from llamatailor.export.gguf_gates import DEFAULT_GATES_PCT, gate_for
from llamatailor.export.rope import GgufRope, check_gguf_rope
from llamatailor.models.loading import load_saved_tokenizer


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
    from pathlib import Path

    from llamatailor.errors import CheckFailed
    from llamatailor.export.merge import MergeResult, check_merge

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
