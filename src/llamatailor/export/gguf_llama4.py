"""Llama 4 (`llama4_text`) in GGUF: llama.cpp's `llama4` architecture, what its loader hard-codes, and how
transformers' fused experts become its tensors.

Sources followed (llama.cpp as vendored by llama-cpp-python 0.3.36; transformers 5.23's configuration_llama4
and modeling_llama4 are the reference):

- src/models/llama4.cpp, load_arch_hparams: reads `expert_feed_forward_length`, `interleave_moe_layer_step`
  and `attention.sliding_window`; unless that key is 0 it fixes chunked attention at 8192 tokens on every
  layer but each 4th (set_swa_pattern(4)), attention temperature tuning at floor 8192, scale 0.1, offset 1,
  and keeps the no-RoPE step at 4 (src/llama-hparams.h); QK norm is on unless there are 128 experts (it is
  an RMS norm without weight, eps `attention.layer_norm_rms_epsilon`, after RoPE, on RoPE layers only).
- load_arch_tensors: layer i is MoE iff (i + 1) % step == 0; experts `ffn_{gate,up}_exps` {hidden, I, E}
  and `ffn_down_exps` {I, hidden, E} (ggml order, the reverse of numpy's), the router `ffn_gate_inp`, the
  shared expert `ffn_{gate,up,down}_shexp` of width I, dense layers `ffn_{gate,up,down}` of width
  `feed_forward_length`; no attention-output bias is loaded.
- src/llama-graph.cpp, build_moe_ffn: top-k of the router logits, sigmoid of the chosen ones, multiplied into
  the input before the experts (as transformers' Llama4TextMoe does); SiLU gate everywhere.
- Rotary embedding is llama.cpp's "norm" type (adjacent pairs), as transformers' complex view of Llama 4's
  heads: Q and K are written without the Llama 1-3 permutation.
"""

import math
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np

from llamatailor.errors import CheckFailed
from llamatailor.models.moe import LLAMA4

LLAMA4_TEXT = "llama4_text"
GATE_UP, DOWN = LLAMA4.expert_parameters  # (E, hidden, 2·I) gate first; (E, I, hidden)

# What llama.cpp's llama4 loader assumes whatever the file says: config key -> (value, llama.cpp's name).
HARD_CODED: dict[str, tuple[Any, str]] = {
    "attention_chunk_size": (8192, "n_swa (chunked attention)"),
    "no_rope_layer_interval": (4, "n_no_rope_layer_step"),
    "attn_temperature_tuning": (True, "attention temperature on every no-RoPE layer"),
    "floor_scale": (8192, "n_attn_temp_floor_scale"),
    "attn_scale": (0.1, "f_attn_temp_scale"),
    "hidden_act": ("silu", "LLM_FFN_SILU"),
    "attention_bias": (False, "no attn_output bias tensor"),
}
ROUTER = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_INP].split(".")[-1]  # "ffn_gate_inp"
# llama.cpp turns QK norm off for its 17B-128E type, i.e. exactly when there are 128 experts.
NO_QK_NORM_EXPERTS = 128


def same(value: Any, expected: Any) -> bool:
    """Config value equals llama.cpp's: floats to float32 precision (as llama.cpp holds them), switches by
    truth (Meta's Scout config has `attn_temperature_tuning: 4`, which transformers reads as on)."""
    if isinstance(expected, bool):
        return bool(value) == expected
    if isinstance(expected, float):
        return isinstance(value, int | float) and math.isclose(value, expected, rel_tol=1e-6)
    return bool(value == expected)


def layer_patterns(config: Any) -> dict[str, tuple[Any, Any]]:
    """Per-layer lists llama.cpp derives from its constants: config key -> (the config's, llama.cpp's)."""
    layers, step = range(config.num_hidden_layers), config.interleave_moe_layer_step
    rope = [int((i + 1) % HARD_CODED["no_rope_layer_interval"][0] != 0) for i in layers]
    return {
        "no_rope_layers": (list(config.no_rope_layers), rope),
        "layer_types": (
            list(config.layer_types),
            ["chunked_attention" if uses else "full_attention" for uses in rope],
        ),
        "moe_layers": (list(config.moe_layers), [i for i in layers if step > 0 and (i + 1) % step == 0]),
        "use_qk_norm": (config.use_qk_norm, config.num_local_experts != NO_QK_NORM_EXPERTS),
    }


def check_llama4(config: Any, where: str) -> None:
    """Refuse a Llama 4 text config that llama.cpp's `llama4` architecture would run differently from
    transformers (before anything is written).

    Args:
        config: A `Llama4TextConfig`.
        where: Starts the message (the model folder).

    Raises:
        CheckFailed: naming every key whose value differs from what llama.cpp hard-codes (HARD_CODED, and the
            layer lists it derives: no_rope_layers, layer_types, moe_layers, use_qk_norm), or no experts.
    """
    problems = [
        f"{key} is {getattr(config, key, None)!r}, llama.cpp assumes {value!r} ({name})"
        for key, (value, name) in HARD_CODED.items()
        if not same(getattr(config, key, None), value)
    ]
    problems += [
        f"{key} is {got!r}, llama.cpp assumes {want!r}"
        for key, (got, want) in layer_patterns(config).items()
        if got != want
    ]
    if config.num_local_experts < 1:
        problems.append("num_local_experts is 0; llama.cpp's llama4 needs at least one expert")
    if problems:
        raise CheckFailed(
            f"{where}: llama.cpp's llama4 architecture would run this Llama 4 differently from transformers, "
            "so its GGUF cannot be checked against the merged model: " + "; ".join(problems)
        )


def write_moe_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    """The keys llama.cpp's llama4 reads beyond a dense Llama's (`feed_forward_length`, written by the
    caller, is the dense layers' `intermediate_size_mlp`)."""
    writer.add_expert_count(config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.intermediate_size)
    writer.add_interleave_moe_layer_step(config.interleave_moe_layer_step)


def kept_f32(name: str) -> bool:
    """Whether a GGUF tensor stays F32 in every file type: the MoE router (`ffn_gate_inp`), whose top-k
    choice flips on small logit differences; llama.cpp's converter writes it F32 and its quantizer never
    quantizes it (llama-quant.cpp), so the F32 written here reaches q8_0 and the K-quants too."""
    return name.endswith(f".{ROUTER}.weight")


def llama4_arrays(key: str, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """(transformers name with its `.weight` suffix, array) as llama.cpp's llama4 wants them: the fused
    `gate_up_proj` (E, hidden, 2·I) transposed to (E, 2·I, hidden) and split into the gate (first half) and
    up experts, (E, I, hidden) each; `down_proj` (E, I, hidden) transposed to (E, hidden, I); every other
    tensor as it is (no Q/K permutation)."""
    if key.endswith(GATE_UP):
        gate, up = np.split(array.transpose(0, 2, 1), 2, axis=1)
        stem = key[: -len("gate_up_proj")]
        yield f"{stem}gate_proj.weight", np.ascontiguousarray(gate)
        yield f"{stem}up_proj.weight", np.ascontiguousarray(up)
    elif key.endswith(DOWN):
        yield f"{key}.weight", np.ascontiguousarray(array.transpose(0, 2, 1))
    else:
        yield key, array
