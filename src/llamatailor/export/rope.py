"""RoPE in GGUF: which of transformers' Llama rope types llama.cpp can reproduce, and what to write for each.

Sources followed (llama.cpp as vendored by llama-cpp-python 0.3.36; transformers 5.23's modeling_rope_utils
is the reference):

- llama_model::load_hparams (src/llama-model.cpp) reads `rope.freq_base`, `rope.scaling.type` (none, linear,
  yarn, longrope; "linear" when absent), `rope.scaling.factor` (freq_scale = 1/factor),
  `rope.scaling.attn_factor` and `rope.scaling.original_context_length` (default: `context_length`). The
  llama and llama4 architectures read none of the `rope.scaling.yarn_*` keys (only grok and mistral3 do), so YaRN's
  beta_fast and beta_slow are always 32 and 1 there.
- The llama_context constructor (src/llama-context.cpp) turns YaRN on (ext_factor 1) for type yarn and sets
  the attention factor to get_mscale(factor) / (1 + 0.1 ln factor) times `rope.scaling.attn_factor`;
  rope_yarn (ggml/src/ggml-cpu/ops.cpp) multiplies it by (1 + 0.1 ln factor) again, and
  ggml_rope_yarn_corr_dims (ggml/src/ggml.c) gives the ramp's ends, floored and ceiled.
- llama_model_llama::load_arch_tensors (src/models/llama.cpp) loads `rope_freqs` (each pair's frequency is
  divided by its factor), or `rope_factors_long`/`rope_factors_short` under longrope, chosen by the context
  size (llama_model::get_rope_factors).

- Llama 4 (src/models/llama4.cpp) reads the same keys under `llama4.` and rotates its RoPE layers with the
  same ggml_rope_ext (adjacent pairs, as transformers' complex view; the rope_freqs of layer 0 serve every
  layer); its RoPE layers are its chunked-attention layers, whose base and scale are copied from the keys
  above (rope_freq_base_train_swa, rope_freq_scale_train_swa) after they are read.

Every written plan is checked here against transformers' own rotary embedding (`LlamaRotaryEmbedding`, or
`Llama4TextRotaryEmbedding` for Llama 4): the angle per position of every dimension pair and the cos/sin
scale that llama.cpp will use must equal transformers' (relative difference below RELATIVE_TOLERANCE),
otherwise the type is refused.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from transformers import AutoConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding

from llamatailor.errors import CheckFailed
from llamatailor.export.gguf_llama4 import LLAMA4_TEXT

# transformers computes its frequencies in fp32: 1e-5 is ~100 fp32 ulps, far below any real mismatch
# (a wrong factor or ramp changes some pair's frequency by 10% or more).
RELATIVE_TOLERANCE = 1e-5
# Beyond what the keys can say: why llama.cpp cannot reproduce these types (measured: docs/export.md).
REFUSED = {
    "dynamic": (
        "transformers' dynamic NTK scaling recomputes the RoPE base from the length of each forward pass "
        "once it exceeds max_position_embeddings (and keeps the largest base seen), while llama.cpp has no "
        "dynamic scaling and uses one fixed base; beyond the original context the GGUF's logits would differ "
        "from the merged model's"
    ),
    "longrope": (
        "transformers picks the long or the short factors by the length of the current sequence, llama.cpp "
        "(rope_factors_long/short) by the context size n_ctx, so the GGUF would match the merged model either "
        "on sequences shorter than original_max_position_embeddings or on longer ones, never on both"
    ),
}
WRITTEN = ("default", "linear", "yarn", "llama3")


@dataclass(frozen=True, eq=False)  # eq would compare numpy arrays
class GgufRope:
    """What GGUF export writes for a model's RoPE, in llama.cpp's terms.

    `scaling` is llama.cpp's `rope.scaling.type`; `factor` the context extension (llama.cpp's freq_scale is
    its inverse); `attn_factor` llama.cpp's `rope.scaling.attn_factor`; `original_context` its
    `rope.scaling.original_context_length` (tokens); `factors` the `rope_freqs` tensor (one divisor per
    dimension pair), or None.
    """

    rope_type: str
    freq_base: float
    scaling: str = "none"
    factor: float = 1.0
    attn_factor: float = 1.0
    original_context: int | None = None
    factors: np.ndarray | None = None

    def keys(self, arch: str = "llama") -> dict[str, str | float | int]:
        """The GGUF metadata to write: full key name to value (str, float32 or uint32)."""
        rope = gguf.Keys.Rope
        keys: dict[str, str | float | int] = {rope.FREQ_BASE.format(arch=arch): self.freq_base}
        if self.scaling != "none":
            keys[rope.SCALING_TYPE.format(arch=arch)] = self.scaling
            keys[rope.SCALING_FACTOR.format(arch=arch)] = self.factor
        if not math.isclose(self.attn_factor, 1.0, rel_tol=1e-7):  # absent means 1 to llama.cpp
            keys[rope.SCALING_ATTN_FACTOR.format(arch=arch)] = self.attn_factor
        if self.original_context is not None:
            keys[rope.SCALING_ORIG_CTX_LEN.format(arch=arch)] = self.original_context
        return keys


def rotary_embedding(config: PretrainedConfig) -> LlamaRotaryEmbedding | Llama4TextRotaryEmbedding:
    """transformers' rotary embedding for `config`'s model type (Llama 1-3 or Llama 4 text): its `inv_freq`
    (radians per position, per dimension pair) and `attention_scaling` are the reference."""
    if config.model_type == LLAMA4_TEXT:
        return Llama4TextRotaryEmbedding(config)
    return LlamaRotaryEmbedding(config)


def rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    """The config's RoPE parameters, whichever name they were saved under (`rope_parameters` in
    transformers 5, `rope_scaling` before), with `rope_type` and `rope_theta` filled in."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    return params


def head_dim_of(config: PretrainedConfig) -> int:
    """Width of one attention head (= the rotated dimensions: Llama rotates the whole head)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def get_mscale(factor: float) -> float:
    """YaRN's default attention factor, as both transformers and llama.cpp define it."""
    return 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0


def llama3_rope_factors(params: dict[str, Any], head_dim: int) -> np.ndarray:
    """Llama 3.1+ divide each rotary frequency by a factor that depends on its wavelength (tokens); llama.cpp
    reads the divisors from `rope_freqs`. Follows transformers' _compute_llama3_parameters and llama.cpp's
    LlamaModel.generate_extra_tensors (conversion/llama.py)."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    factors = []
    for index in range(0, head_dim, 2):
        wavelength = 2 * math.pi * params["rope_theta"] ** (index / head_dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def plan_rope(config: PretrainedConfig, params: dict[str, Any]) -> GgufRope:
    """The llama.cpp keys for one of the WRITTEN types (before verification)."""
    rope_type, base = params["rope_type"], float(params["rope_theta"])
    if rope_type == "linear":
        return GgufRope(rope_type, base, "linear", float(params["factor"]))
    if rope_type == "llama3":
        return GgufRope(rope_type, base, factors=llama3_rope_factors(params, head_dim_of(config)))
    if rope_type == "yarn":
        original = int(params.get("original_max_position_embeddings") or config.max_position_embeddings)
        factor = float(params.get("factor") or config.max_position_embeddings / original)
        # transformers scales cos/sin by attention_factor (default get_mscale(factor)); llama.cpp by
        # get_mscale(factor) times rope.scaling.attn_factor, so the key carries the ratio.
        attention = rotary_embedding(config).attention_scaling
        return GgufRope(rope_type, base, "yarn", factor, attention / get_mscale(factor), original)
    return GgufRope(rope_type, base)


def llama_cpp_rotation(rope: GgufRope, head_dim: int, context_length: int) -> tuple[np.ndarray, float]:
    """The angle per position (radians) of each dimension pair, and the cos/sin scale, that llama.cpp applies
    for `rope`: rope_yarn and ggml_rope_cache_init (ggml-cpu/ops.cpp), the llama_context constructor."""
    pairs = np.arange(head_dim // 2, dtype=np.float64)
    theta = rope.freq_base ** (-2.0 * pairs / head_dim)
    if rope.factors is not None:
        theta = theta / rope.factors.astype(np.float64)
    freq_scale = 1.0 / rope.factor if rope.scaling != "none" else 1.0
    if rope.scaling != "yarn":
        return theta * freq_scale, rope.attn_factor
    original = rope.original_context or context_length

    def corr_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.freq_base))

    low, high = max(0.0, math.floor(corr_dim(32.0))), min(head_dim - 1.0, math.ceil(corr_dim(1.0)))
    ramp = 1 - np.clip((pairs - low) / max(0.001, high - low), 0, 1)
    angle = theta * freq_scale * (1 - ramp) + theta * ramp
    growth = 1.0 + 0.1 * math.log(rope.factor)
    return angle, get_mscale(rope.factor) / growth * rope.attn_factor * growth


def verify_rope(rope: GgufRope, config: PretrainedConfig, where: str) -> None:
    """Raise CheckFailed unless llama.cpp's rotation for `rope` equals transformers' for `config`."""
    reference = rotary_embedding(config)
    expected = reference.inv_freq.double().numpy()
    angle, scale = llama_cpp_rotation(rope, head_dim_of(config), config.max_position_embeddings)
    if angle.shape != expected.shape:
        raise CheckFailed(
            f"{where}: rope_type {rope.rope_type!r}: transformers rotates {expected.size} dimension pairs per "
            f"head, llama.cpp would rotate {angle.size}; GGUF export cannot write this model's RoPE"
        )
    error = np.abs(angle - expected) / expected
    worst = int(np.argmax(error))
    if error[worst] > RELATIVE_TOLERANCE or abs(scale / reference.attention_scaling - 1) > RELATIVE_TOLERANCE:
        raise CheckFailed(
            f"{where}: rope_type {rope.rope_type!r} with parameters {rope_parameters(config)} cannot be written "
            f"to GGUF: llama.cpp would rotate dimension pair {worst} by {angle[worst]:.6g} rad/token where "
            f"transformers uses {expected[worst]:.6g}, and scale cos/sin by {scale:.6g} where transformers uses "
            f"{reference.attention_scaling:.6g} (llama.cpp's llama and llama4 read rope.scaling.type, factor, "
            "attn_factor, original_context_length and rope_freqs only; YaRN's beta_fast/beta_slow are fixed at "
            "32/1, truncated)"
        )


def gguf_rope(config: PretrainedConfig, where: str = "the model") -> GgufRope:
    """What to write for `config`'s RoPE (keys and the optional `rope_freqs` tensor), proven to rotate as
    transformers does. Raises CheckFailed naming the rope type and the reason when llama.cpp cannot
    reproduce it (dynamic, longrope, unknown types, or parameters the llama architecture has no key for);
    `where` (a folder) starts the message."""
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type in REFUSED:
        raise CheckFailed(
            f"{where}: rope_type {rope_type!r} cannot be exported to GGUF: {REFUSED[rope_type]}"
        )
    if rope_type not in WRITTEN:
        raise CheckFailed(
            f"{where}: rope_type {rope_type!r} is not one GGUF export can write (it writes {', '.join(WRITTEN)})"
        )
    rope = plan_rope(config, params)
    verify_rope(rope, config, where)
    return rope


def check_gguf_rope(folder: Path) -> GgufRope:
    """Refuse, before anything is written, a model folder whose RoPE llama.cpp cannot reproduce: the check
    export runs first. Returns what GGUF export will write; raises CheckFailed (see gguf_rope)."""
    return gguf_rope(AutoConfig.from_pretrained(folder), str(folder))
