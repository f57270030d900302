"""How much a GGUF file may lose against the merged model: a perplexity gate for every GGUF type, with a
default per type that the run file can override (`export.gates`).

Source of the defaults: llama.cpp's own measurements, as the pinned sources publish them
(`tools/quantize/quantize.cpp`'s "+ΔPPL @ Llama-3-8B" per type, and the LLaMA 3 8b scoreboard in
`tools/perplexity/README.md`: 6.2316 for the bf16 base, no importance matrix, as our quantizer runs).
The gate is 1 % (room for the few hundred answer tokens the check scores: the demo's q8_0 measured +0.43 %) plus four times that relative
increase: small models lose more to quantization than an 8B one (SmolLM2-135M's q4_k_m lost about 6 %
where Llama-3-8B's loses 2.8 %, because its width 576 is no multiple of K-quants' 256-wide blocks).
"""

from collections.abc import Mapping

from llamatailor.vocabulary import GgufType

LLAMA3_8B_BASE_PPL = 6.2316
# llama.cpp's published perplexity increase of Llama-3-8B on wikitext-2, per type, without imatrix.
LLAMA3_8B_DELTA_PPL = {
    "f32": 0.0,
    "f16": 0.0015,
    "bf16": 0.0,
    "q8_0": 0.0026,
    "q6_k": 0.0217,
    "q5_k_m": 0.0569,
    "q5_k_s": 0.1049,
    "q5_0": 0.1316,
    "q4_k_m": 0.1754,
    "q4_k_s": 0.2689,
    "q4_0": 0.4685,
    "q3_k_m": 0.6569,
    "q2_k": 3.5199,
}
FLOOR_PCT = 1.0
SMALL_MODEL_FACTOR = 4.0

DEFAULT_GATES_PCT = {
    gguf_type: round(FLOOR_PCT + SMALL_MODEL_FACTOR * 100 * delta / LLAMA3_8B_BASE_PPL, 1)
    for gguf_type, delta in LLAMA3_8B_DELTA_PPL.items()
}


def gate_for(gguf_type: GgufType, overrides: Mapping[GgufType, float]) -> float:
    """The largest perplexity increase allowed for `gguf_type`, in percent: the run file's, else the
    default. Raises KeyError for a type with neither (config validation names the known types)."""
    return overrides.get(gguf_type, DEFAULT_GATES_PCT[gguf_type])
