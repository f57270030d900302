"""GGUF export and RoPE scaling: every rope type transformers accepts for Llama is either written so that
llama.cpp's logits equal the transformers model's beyond the original context, or refused before any file
is written (issue 13, fault 3).

The tiny models are initialised with std 0.1 instead of transformers' 0.02: at 0.02 the logits are nearly
uniform (std 0.16) and attention almost ignores position, so even a wrong RoPE moves logits by < 0.01;
at 0.1 the logits' std is 0.8 and omitting linear scaling moves them by 3.9 (top-1 agreement 0.15).
Both sides compute in fp32 (transformers fp32, GGUF f32, llama.cpp's KV cache f32 instead of its f16
default). Measured max |Δlogit| over all 192 positions: 4e-6 (default, linear, llama3), 7e-6 (yarn),
1.8e-5 (yarn with attention_factor). TOLERANCE = 1e-3 sits 50x above that fp32 noise and 3,000x below the
divergence of a file that lacks the scaling keys.
"""

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llamatailor.config import ModelSection
from llamatailor.errors import CheckFailed
from llamatailor.export.gguf_file import write_gguf
from llamatailor.export.rope import check_gguf_rope, gguf_rope
from llamatailor.models.loading import load_saved_tokenizer
from tiny_models import real_tokenizer, save_random_llama

ORIGINAL = 64  # the "original context" of every tiny model, in tokens
LENGTH = 3 * ORIGINAL
TOLERANCE = 1e-3
SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.1,
}
THETA = {"rope_theta": 10000.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, **THETA}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
PREFIX = "llama.rope."
# case: (max_position_embeddings, rope_parameters, expected rope keys, llama.cpp settings that reproduce a
# file without the fix; None where there is no such file to compare with)
WRITTEN = {
    "default": (ORIGINAL, {"rope_type": "default", **THETA}, {}, None),
    "linear": (
        ORIGINAL,
        {"rope_type": "linear", "factor": 4.0, **THETA},
        {"scaling.type": "linear", "scaling.factor": 4.0},
        {"rope_scaling_type": llama_cpp.LLAMA_ROPE_SCALING_TYPE_NONE},  # = no scaling keys in the file
    ),
    "yarn": (
        4 * ORIGINAL,
        YARN,
        {"scaling.type": "yarn", "scaling.factor": 4.0, "scaling.original_context_length": ORIGINAL},
        {"rope_scaling_type": llama_cpp.LLAMA_ROPE_SCALING_TYPE_NONE},
    ),
    "yarn-attention-factor": (
        4 * ORIGINAL,
        {**YARN, "attention_factor": 1.5},
        {
            "scaling.type": "yarn",
            "scaling.factor": 4.0,
            "scaling.original_context_length": ORIGINAL,
            "scaling.attn_factor": 1.5 / (1 + 0.1 * np.log(4.0)),  # llama.cpp multiplies by get_mscale
        },
        {"kv_overrides": {"llama.rope.scaling.attn_factor": 1.5}},  # transformers' value written as is
    ),
    "llama3": (
        4 * ORIGINAL,
        {**LLAMA3, "original_max_position_embeddings": ORIGINAL, **THETA},
        {},
        None,
    ),
}
REFUSED = {
    "dynamic": (ORIGINAL, {"rope_type": "dynamic", "factor": 4.0, **THETA}, "dynamic NTK"),
    "longrope": (
        4 * ORIGINAL,
        {
            "rope_type": "longrope",
            "short_factor": [1.0, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6],
            "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
            "original_max_position_embeddings": ORIGINAL,
            **THETA,
        },
        "n_ctx",
    ),
    # transformers' untruncated YaRN ramp (gpt-oss style): llama.cpp always truncates it
    "yarn": (4 * ORIGINAL, {**YARN, "truncate": False}, "truncated"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return real_tokenizer("chatml")


@pytest.fixture(scope="module")
def tokens(tokenizer) -> list[int]:
    return np.random.default_rng(0).integers(0, len(tokenizer), LENGTH).tolist()


def tiny(tokenizer, folder, context: int, rope: dict):
    return save_random_llama(
        tokenizer, folder, 3, max_position_embeddings=context, rope_parameters=rope, **SHAPE
    )


def llama_cpp_logits(path, tokens: list[int], **settings) -> np.ndarray:
    """Logits at every position from llama.cpp, KV cache in f32 (its default f16 adds ~1e-3 noise)."""
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=LENGTH,
        logits_all=True,
        verbose=False,
        n_threads=1,
        type_k=f32,
        type_v=f32,
        **settings,
    )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)])
    finally:
        llm.close()


def rope_keys(reader: gguf.GGUFReader) -> dict:
    return {
        name[len(PREFIX) :]: field.contents()
        for name, field in reader.fields.items()
        if name.startswith(PREFIX)
    }


@pytest.mark.parametrize("case", list(WRITTEN))
def test_written_rope_matches_transformers_beyond_the_original_context(case, tokenizer, tokens, tmp_path):
    context, rope, expected_keys, without_fix = WRITTEN[case]
    folder = tiny(tokenizer, tmp_path / "model", context, rope)
    path = write_gguf(folder, tmp_path / "m.gguf", "f32", load_saved_tokenizer(folder, ModelSection()), case)

    reader = gguf.GGUFReader(path)  # once: it parses the 49k-token vocabulary in Python (~3 s)
    keys = rope_keys(reader)
    assert keys.pop("freq_base") == 10000.0 and keys.pop("dimension_count") == 16
    assert keys == {
        k: pytest.approx(v, rel=1e-6) if isinstance(v, float) else v for k, v in expected_keys.items()
    }
    factors = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    if case == "llama3":  # 16-dim heads: pair 0 kept, pairs 1-2 smoothed, pairs 3-7 divided by the factor
        np.testing.assert_allclose(factors[0].data, [1, 1.2939758, 7.667385, 8, 8, 8, 8, 8], rtol=1e-6)
    else:
        assert not factors

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor([tokens])).logits[0].numpy()
    logits = llama_cpp_logits(path, tokens)
    difference = np.abs(logits - reference).max(axis=1)  # per position; [ORIGINAL:] is beyond the original
    assert difference.max() < TOLERANCE, (
        f"max |Δlogit| {difference.max():.2e} at position {difference.argmax()}"
    )
    assert (logits.argmax(axis=1) == reference.argmax(axis=1)).all()  # top-1 agreement 1.0 at all 192

    if without_fix is not None:  # the same check fails on the file export wrote before the fix
        broken = np.abs(llama_cpp_logits(path, tokens, **without_fix) - reference)[ORIGINAL:].max()
        assert broken > 1.0, f"without the fix max |Δlogit| beyond the original context is only {broken:.2e}"


@pytest.mark.parametrize("case", list(REFUSED))
def test_rope_llama_cpp_cannot_reproduce_is_refused_before_writing(case, tokenizer, tmp_path):
    context, rope, reason = REFUSED[case]
    folder = tiny(tokenizer, tmp_path / "model", context, rope)
    target = tmp_path / "m.gguf"
    with pytest.raises(CheckFailed) as refused:
        write_gguf(folder, target, "f32", load_saved_tokenizer(folder, ModelSection()), case)
    message = str(refused.value)
    assert f"rope_type {rope['rope_type']!r}" in message and reason in message and str(folder) in message
    assert not target.exists() and list(tmp_path.iterdir()) == [folder]
    with pytest.raises(CheckFailed, match=rope["rope_type"]):  # the check the export stage runs first
        check_gguf_rope(folder)


def test_rope_scaling_under_its_older_name_is_read():
    """Configs saved before transformers 5 call it `rope_scaling` (with `type`) and keep rope_theta outside."""
    config = LlamaConfig.from_dict(
        {
            **SHAPE,
            "max_position_embeddings": 4096,
            "rope_theta": 500000.0,
            "rope_scaling": {"type": "linear", "factor": 2.0},
        }
    )
    assert gguf_rope(config).keys() == {
        "llama.rope.freq_base": 500000.0,
        "llama.rope.scaling.type": "linear",
        "llama.rope.scaling.factor": 2.0,
    }
