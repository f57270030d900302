"""Memory to serve a model on one device: its weights at a bit width, and the KV cache for a context.

* weights: every decoder layer's matrices (attention, MLPs, routed and shared experts) at `bits`: 16 in the
  compute dtype; 8 and 4 as bitsandbytes stores them (`memory.quantized_bytes_per_weight`: 1 byte; NF4
  with double-quantized constants, 4.127 bits), the way transformers quantizes a model on the fly. The
  router, embeddings, output head and norms stay in the compute dtype.
* KV cache: keys and values of `kv_width` per layer and token, in the compute dtype, for `context` tokens
  of each of `batch` sequences; a layer with chunked attention (Llama 4's RoPE layers) keeps only its last
  `attention_chunk` tokens, as transformers' hybrid chunked cache and vLLM do.
* overhead: CUDA workspaces and allocator slack, as for training (`memory.OVERHEAD_BYTES`).

A prefill's own working memory (one layer's activations for the prompt) is not counted: serving engines
split long prompts into chunks, which keeps it small beside these terms.
"""

from dataclasses import dataclass

from llamatailor.plan.architectures import Architecture
from llamatailor.plan.memory import OVERHEAD_BYTES, Device, quantized_bytes_per_weight

INFERENCE_BITS = (4, 8, 16)
INFERENCE_CONTEXT = 8192  # tokens of KV cache the plan's inference rows hold by default


@dataclass(frozen=True)
class InferenceBreakdown:
    """Bytes on one device to serve `context` tokens of `batch` sequences with weights at `bits`."""

    bits: int
    context: int
    batch: int
    weights: int
    kv_cache: int
    overhead: int

    @property
    def total(self) -> int:
        """The peak: weights, KV cache and overhead."""
        return self.weights + self.kv_cache + self.overhead


def kv_cache_bytes(arch: Architecture, context: int, batch: int, dtype_bytes: int) -> int:
    """Keys and values of every layer for `context` tokens (chunked layers: at most one chunk)."""
    chunked = min(context, arch.attention_chunk) if arch.attention_chunk else context
    tokens = arch.chunked_layers * chunked + (arch.layers - arch.chunked_layers) * context
    return 2 * arch.kv_width * dtype_bytes * batch * tokens


def inference_estimate(
    arch: Architecture, bits: int, context: int, dtype_bytes: int, batch: int = 1, device: Device = "cuda"
) -> InferenceBreakdown:
    """Memory to serve `arch` with its layers' weights at `bits` (4, 8 or 16; see the module docstring).

    Args:
        arch: The model's shape.
        bits: Weight bits of the decoder layers' matrices; 16 keeps them in the compute dtype.
        context: Tokens held in the KV cache per sequence.
        dtype_bytes: Bytes of the compute dtype (activations, KV cache, unquantized weights).
        batch: Sequences served at once.
        device: cuda or cpu (the overhead term).

    Raises:
        ValueError: `bits` is not one of INFERENCE_BITS.
    """
    if bits not in INFERENCE_BITS:
        raise ValueError(f"inference bits {bits}: expected one of {', '.join(map(str, INFERENCE_BITS))}")
    per_weight = dtype_bytes if bits == 16 else quantized_bytes_per_weight(bits, double_quant=True)
    quantized = arch.layer_linear_params() - arch.router_params()
    unquantized = arch.router_params() + arch.embedding_params() + arch.norm_params()
    return InferenceBreakdown(
        bits=bits,
        context=context,
        batch=batch,
        weights=round(quantized * per_weight) + unquantized * dtype_bytes,
        kv_cache=kv_cache_bytes(arch, context, batch, dtype_bytes),
        overhead=OVERHEAD_BYTES[device],
    )
