"""Peak training memory per device, term by term.

Every term is bytes = count x bytes per element, for one device (GPU, or the CPU process):

* weights: parameters x their bytes. QLoRA stores the layers' linear weights in `bits` bits plus the
  quantization constants: NF4 blocks of 64 weights share one fp32 absmax (0.5 bit/weight), or with double
  quantization an 8-bit absmax plus one fp32 constant per 256 blocks (8/64 + 32/16384 = 0.127 bit/weight)
  [Dettmers et al. 2023, QLoRA, sec. 3]. Embeddings and output head stay unquantized in the compute dtype,
  norms in fp32.
  Mixture-of-Experts (Llama 4): the routed experts are fused 3-D parameters, not linear layers, so
  bitsandbytes leaves them in the compute dtype under llamatailor's QLoRA; `Setup.expert_bits` plans them
  quantized, as Axolotl's linearized experts are. The router (an nn.Linear subclass) also stays unquantized.
* trainable parameters: LoRA adds r x (in + out) per adapted linear layer [Hu et al. 2021], DoRA one
  magnitude per output feature [Liu et al. 2024]; full fine-tuning trains every weight. LoRA on the routed
  experts (targets: experts) follows PEFT's `ParamWrapper`: each fused parameter (E, rows, columns) gets
  lora_A (r_e x E, columns) and lora_B (rows, r_e x E), r_e the rank per expert (`models.moe.expert_rank`).
  The adapters' own weights count with the weights (in `adapter_bytes`).
* gradients: one per trainable parameter, in its dtype.
* optimizer states: AdamW keeps two per trainable parameter in its dtype; bitsandbytes' 8-bit AdamW one
  byte each and its 32-bit ones two fp32 states [Dettmers et al. 2022, 8-bit optimizers]; paged variants
  hold the same bytes but may page them to CPU under pressure. ZeRO-2 shards gradients and states over the GPUs; ZeRO-3 / FSDP also the weights,
  plus two layers gathered at a time [Rajbhandari et al. 2020, ZeRO].
* activations: the tensors autograd saves in a forward pass, counted per token and per decoder layer for
  transformers' Llama with SDPA attention (which saves q, k, v, output and log-sum-exp, never the s x s
  scores) [Korthikanti et al. 2022 derive the same kind of count for GPT]; see `layer_activation_elements`.
  Each count was checked exactly against `torch.autograd.graph.saved_tensors_hooks` (tests/test_plan.py).
  Llama 4 adds its QK L2 norm's input and 1/norm on RoPE layers; its MoE layer (transformers'
  `Llama4TextMoe`) sends every token through every routed expert, weighted 0 where not chosen, so it saves
  E x hidden (the repeated input) and E x 3I (each expert's gate/up and silu) per token, plus the router's
  fp32 scores and int64 choices; adapted experts also save their E x hidden input and E x I down input, and
  PEFT's adapter materializes each MoE layer's experts (W + B·A, saved for backward, and its gradient in
  backward: one layer's expert weights each).
  With gradient checkpointing only each layer's input is kept, and one layer is recomputed at a time, in
  backward, after the loss's own working memory is freed: the two do not add up.
* logits and loss: llamatailor's own loss (`train/answer_loss.py`, the default `answer`) keeps only the
  answer positions' hidden states and runs the head in chunks of 16M logits whose gradients are computed in
  the forward pass: about 2.5 chunk-sized fp32 temporaries at once (measured), the answer hidden states and their gradient
  (and, for full fine-tuning, the head's fp32 gradient). For other trainers:
  TRL's fused LM head never builds the [tokens x vocab] logits: it projects tiles of
  4,096 tokens x 32,768 vocabulary entries with an online log-sum-exp and recomputes them in backward. On
  GPUs (Triton) it scores answer tokens only and folds tiles in place; its CPU fallback scores every token
  and keeps about 8.5 tile-sized temporaries alive in backward (measured, bench/plan_memory.py).
* overhead: CUDA workspaces and allocator slack on GPUs; on CPU, small tensors of the trainer and data.

The estimate is the peak of memory held by tensors, what `torch.cuda.max_memory_allocated` reports on a
GPU. A CPU process's resident memory runs higher: the C allocator keeps freed heap memory for reuse.

Peak: weights + optimizer states + overhead + the larger of (saved activations + the larger of the loss's
working memory and one recomputed layer), which peaks as backward starts, and (gradients + the optimizer
step's temporaries), which peaks at the end of a step. On GPUs torch's multi-tensor AdamW holds one
gradient-sized temporary; on CPU it steps one parameter at a time, with two temporaries the size of the
largest trainable tensor (measured, bench/plan_memory.py).
"""

from dataclasses import dataclass, field
from typing import Literal

from llamatailor.config import LoraSection
from llamatailor.errors import ConfigError
from llamatailor.hardware import chunk_rows
from llamatailor.models.moe import expert_rank
from llamatailor.plan.architectures import Architecture
from llamatailor.vocabulary import (
    BF16,
    EXPERTS,
    FP16,
    FP32,
    LLAMA_LINEARS,
    METHODS,
    Method,
    Optimizer,
    Precision,
    Sharding,
    unknown_name,
)

Device = Literal["cuda", "cpu"]
LossImplementation = Literal["answer", "fused", "chunked", "logits"]

DTYPE_BYTES: dict[Precision, int] = {FP32: 4, BF16: 2, FP16: 2}
TOKEN_TILE, VOCAB_TILE = 4096, 32768
ANSWER_LOSS_CHUNKS = 2.5  # chunk-sized temporaries alive at once, measured (bench/plan_memory.py)
CPU_LOSS_TILES = 8.5  # tile-sized temporaries alive at once in the CPU fallback's backward (measured)
GPU_LOSS_TILES = 2  # the tile buffer, forward and backward (Triton folds it in place)
OVERHEAD_BYTES = {"cuda": 256 * 2**20, "cpu": 32 * 2**20}
GIB = 2**30
# Optimizer states per trainable parameter: (how many, bytes each; None: the parameter's own dtype).
# torch's AdamW keeps two in the parameter's dtype; bitsandbytes' 8-bit ones one byte each, its 32-bit
# ones two fp32 states; paged variants hold the same bytes.
OPTIMIZER_STATES: dict[Optimizer, tuple[int, int | None]] = {
    "adamw": (2, None),
    "adamw_8bit": (2, 1),
    "paged_adamw_8bit": (2, 1),
    "paged_adamw_32bit": (2, 4),
}


@dataclass(frozen=True)
class Setup:
    """Everything the memory depends on; defaults are llamatailor's own training stack on a GPU."""

    method: Method = "lora"
    seq_len: int = 2048
    micro_batch: int = 1
    gradient_checkpointing: bool = True
    precision: Precision = BF16
    optimizer: Optimizer = "adamw"
    lora_r: int = 16
    lora_targets: tuple[str, ...] = LLAMA_LINEARS
    lora_dropout: float = 0.0
    dora: bool = False
    lora_experts: bool = False  # targets: experts: the routed experts' fused parameters are adapted too
    expert_r: int | None = None  # LoRA rank per routed expert; None: `models.moe.expert_rank`'s auto rule
    bits: Literal[4, 8] = 4
    # QLoRA's routed experts: None keeps them in the compute dtype, as llamatailor's trainer does
    # (bitsandbytes quantizes nn.Linear only); 4 or 8 plans them quantized, as Axolotl's linearized experts.
    expert_bits: Literal[4, 8] | None = None
    double_quant: bool = True
    adapter_bytes: int = 4  # PEFT creates adapter weights in fp32
    gpus: int = 1
    sharding: Sharding = "none"
    device: Device = "cuda"
    loss: LossImplementation = "answer"
    answer_share: float = 1.0  # share of tokens that are scored (GPU fused head: answer tokens only)

    def __post_init__(self) -> None:
        """Refuse a method, precision or optimizer the planner has no rule for: a fallback rule would plan
        another run than the one asked for. Raises ConfigError naming it and the known ones."""
        for kind, name, known in (
            ("method", self.method, METHODS),
            ("precision", self.precision, DTYPE_BYTES),
            ("optimizer", self.optimizer, OPTIMIZER_STATES),
        ):
            if name not in known:
                raise ConfigError(unknown_name(kind, name, known))

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.precision]


@dataclass(frozen=True)
class Breakdown:
    """Bytes per device; `total` is the estimated peak (see the module docstring for how terms combine)."""

    weights: int  # the frozen or trained base, and the adapters' own weights
    trainable_parameters: int
    gradients: int
    optimizer: int
    activations: int  # saved by the forward pass
    logits_and_loss: int
    overhead: int
    optimizer_step: int = 0
    recomputed_layer: int = 0  # with gradient checkpointing, one layer's activations rebuilt in backward
    # PEFT's adapter on fused experts: the gradient of one MoE layer's materialized experts, in its backward
    expert_weight_gradient: int = 0
    weight_terms: dict[str, int] = field(default_factory=dict)  # `weights` part by part (sums to it)
    expert_adapter_parameters: int = 0  # of `trainable_parameters`: the LoRA on routed experts
    expert_optimizer: int = 0  # of `optimizer`: the states of the routed experts' LoRA
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        layer_backward = self.recomputed_layer + self.expert_weight_gradient
        backward_start = self.activations + max(self.logits_and_loss, layer_backward)
        step_end = self.gradients + self.optimizer_step
        return self.weights + self.optimizer + self.overhead + max(backward_start, step_end)

    def terms(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer states": self.optimizer,
            "activations": self.activations + self.recomputed_layer + self.expert_weight_gradient,
            "logits and loss": self.logits_and_loss,
            "overhead": self.overhead,
        }


def adapted_linears(arch: Architecture, targets: tuple[str, ...]) -> list[tuple[int, int, int]]:
    """(in, out, count over the model) of every linear layer an adapter is put on: attention in every
    layer, the MLP of dense layers and the shared expert of MoE layers (routed experts: `expert_adapter_*`)."""
    found = []
    for name, (fan_in, fan_out) in arch.attention_linears().items():
        if name in targets:
            found.append((fan_in, fan_out, arch.layers))
    for name, (fan_in, fan_out) in arch.mlp_linears(arch.dense_width).items():
        if name in targets and arch.dense_layers:
            found.append((fan_in, fan_out, arch.dense_layers))
    if arch.moe_layers and arch.shared_expert:
        for name, (fan_in, fan_out) in arch.mlp_linears(arch.intermediate).items():
            if name in targets:
                found.append((fan_in, fan_out, arch.moe_layers))
    return found


def expert_lora_rank(arch: Architecture, setup: Setup) -> int:
    """The LoRA rank per routed expert (`Setup.expert_r`, else the trainer's auto rule); 0 when the routed
    experts are not adapted (other targets, full fine-tuning, or a dense model)."""
    if setup.method == "full" or not setup.lora_experts or not arch.moe_layers:
        return 0
    if setup.expert_r is not None:
        return setup.expert_r
    return expert_rank(LoraSection(r=setup.lora_r, targets=EXPERTS), arch.experts)


def expert_adapter_parameters(arch: Architecture, setup: Setup) -> int:
    """LoRA parameters on the routed experts: per MoE layer and fused parameter (E, rows, columns), r_e x E x
    (rows + columns), PEFT's lora_A (r_e x E, columns) and lora_B (rows, r_e x E)."""
    per_layer = sum(rows + columns for rows, columns in arch.expert_parameters().values())
    return arch.moe_layers * expert_lora_rank(arch, setup) * arch.experts * per_layer


def trainable_parameters(arch: Architecture, setup: Setup) -> int:
    """Parameters that train: every weight for full fine-tuning; else r x (in + out) per adapted linear
    layer (LoRA, Hu et al. 2021; rsLoRA only rescales) plus one magnitude per output feature with DoRA
    (Liu et al. 2024), as PEFT creates them, plus the routed experts' LoRA (`expert_adapter_parameters`)."""
    if setup.method == "full":
        return arch.total_params()
    count = sum(
        setup.lora_r * (fan_in + fan_out) * n
        for fan_in, fan_out, n in adapted_linears(arch, setup.lora_targets)
    )
    if setup.dora:
        count += sum(fan_out * n for _, fan_out, n in adapted_linears(arch, setup.lora_targets))
    return count + expert_adapter_parameters(arch, setup)


def largest_trainable(arch: Architecture, setup: Setup) -> int:
    """Elements of the largest tensor that trains: the embedding, a weight matrix or a fused expert
    parameter (all E experts), or a LoRA factor."""
    experts = [arch.experts * rows * columns for rows, columns in arch.expert_parameters().values()]
    if setup.method == "full":
        linears = [
            *arch.attention_linears().values(),
            *arch.mlp_linears(arch.dense_width).values(),
            *arch.mlp_linears(arch.intermediate).values(),
        ]
        return max(arch.vocab * arch.hidden, *(fan_in * fan_out for fan_in, fan_out in linears), *experts)
    factors = [
        setup.lora_r * max(fan_in, fan_out)
        for fan_in, fan_out, _ in adapted_linears(arch, setup.lora_targets)
    ]
    rank = expert_lora_rank(arch, setup)
    if rank:  # lora_A (r_e x E, columns), lora_B (rows, r_e x E)
        factors += [rank * arch.experts * max(shape) for shape in arch.expert_parameters().values()]
    return max(factors, default=0)


def quantized_bytes_per_weight(bits: int, double_quant: bool) -> float:
    """bitsandbytes' storage per weight: 1 byte at 8 bits; at 4 bits (NF4) half a byte plus the blocks'
    absmax constants (0.127 bit with double quantization, 0.5 without) [Dettmers et al. 2023]."""
    return 1.0 if bits == 8 else (4 + (0.127 if double_quant else 0.5)) / 8


def weight_terms(arch: Architecture, setup: Setup) -> dict[str, int]:
    """The frozen or trained base's bytes, part by part (parts a model lacks are left out): attention, the
    routed experts, the MLPs (a MoE model's shared expert and dense layers), the router, embeddings and
    output head, norms. QLoRA quantizes the linear layers (`quantized_bytes_per_weight`); the routed
    experts only with `Setup.expert_bits`; router, embeddings and head stay in the compute dtype, norms fp32.
    """
    dense = 4 if setup.device == "cpu" else setup.compute_bytes
    qlora = setup.method == "qlora"
    linear = quantized_bytes_per_weight(setup.bits, setup.double_quant) if qlora else dense
    expert = (
        quantized_bytes_per_weight(setup.expert_bits, setup.double_quant)
        if qlora and setup.expert_bits
        else dense
    )
    parts = {
        "attention": arch.attention_params() * linear,
        "routed experts": arch.routed_expert_params() * expert,
        "shared expert and dense MLP" if arch.experts else "MLP": arch.shared_and_dense_mlp_params() * linear,
        "router": arch.router_params() * dense,
        "embeddings and head": arch.embedding_params() * dense,
        "norms": arch.norm_params() * (4 if qlora else dense),
    }
    return {name: round(size) for name, size in parts.items() if size}


def weight_bytes(arch: Architecture, setup: Setup) -> int:
    """The base model's bytes (adapters not included): the sum of `weight_terms`."""
    return sum(weight_terms(arch, setup).values())


def layer_activation_elements(
    arch: Architecture, setup: Setup, moe: bool = False, qk_norm: bool = False
) -> int:
    """Elements autograd saves per token in one decoder layer (transformers Llama or Llama 4, SDPA attention).

    Always: each RMSNorm's input and 1/rms (2 x (h + 1)); SDPA's q, k, v, output and log-sum-exp
    (2 x q_width + 2 x kv_width + heads; o_proj reads the output in place, so it adds nothing); SwiGLU's
    gate, silu(gate) and up (3 x I). Then, per weight that trains: each RMSNorm's normalized input (h); the
    input of the q/k/v projections (h, shared) and of gate/up (h, shared), and down_proj's (I); the r-wide
    output of each adapter's A. Llama 4: with `qk_norm` (its RoPE layers), the L2 norm's input and 1/norm of
    queries and keys; a `moe` layer's SwiGLU is its shared expert's (width I), plus `routed_expert_elements`.
    """

    h, q, kv, heads = arch.hidden, arch.q_width, arch.kv_width, arch.heads
    width = arch.intermediate if moe else arch.dense_width
    full = setup.method == "full"
    targets = set(LLAMA_LINEARS) if full else set(setup.lora_targets)
    elements = 2 * (h + 1) + 2 * q + 2 * kv + heads + 3 * width
    elements += q + kv + heads + arch.kv_heads if qk_norm else 0
    elements += 2 * h if full else 0
    elements += h if targets & {"q_proj", "k_proj", "v_proj"} else 0
    elements += h if targets & {"gate_proj", "up_proj"} else 0
    elements += width if "down_proj" in targets else 0
    if not full:
        elements += setup.lora_r * len(targets)
    return elements + (routed_expert_elements(arch, setup) if moe else 0)


def routed_expert_elements(arch: Architecture, setup: Setup) -> int:
    """Elements a MoE layer's routed experts save per token: transformers' `Llama4TextMoe` sends every token
    through all E experts (weighted 0 where not chosen), so: the repeated input and its routing weight
    (E x (h + 1)), each expert's fused gate/up output and silu(gate) (E x 3I); trained or adapted experts
    also save their scaled input (E x h) and down_proj's input (E x I)."""
    e, h, i = arch.experts, arch.hidden, arch.intermediate
    trained = setup.method == "full" or expert_lora_rank(arch, setup) > 0
    return e * (h + 1) + 3 * e * i + (e * (h + i) if trained else 0)


def router_bytes_per_token(arch: Architecture) -> int:
    """The router's saved fp32 sigmoid scores (E) and int64 top-k choices, per token of a MoE layer."""
    return 4 * arch.experts + 8 * arch.experts_per_token


def materialized_expert_bytes(arch: Architecture, setup: Setup) -> int:
    """One MoE layer's routed experts as PEFT's adapter on fused parameters builds them for each forward
    (W + B·A, saved for backward; its gradient in backward is as large); 0 without that adapter, and for
    linearized experts (`expert_bits`), which are ordinary linear layers."""
    if not expert_lora_rank(arch, setup) or setup.expert_bits is not None:
        return 0
    return arch.experts * 3 * arch.hidden * arch.intermediate * setup.compute_bytes


def layer_activation_bytes(arch: Architecture, setup: Setup, moe: bool = False, qk_norm: bool = False) -> int:
    """One decoder layer's saved activations for the whole micro-batch (see `layer_activation_elements`)."""
    elements = layer_activation_elements(arch, setup, moe, qk_norm)
    per_token = elements * setup.compute_bytes + _dropout_per_layer(arch, setup)
    if not moe:
        return setup.tokens * per_token
    return setup.tokens * (per_token + router_bytes_per_token(arch)) + materialized_expert_bytes(arch, setup)


def largest_layer_bytes(arch: Architecture, setup: Setup) -> int:
    """The largest one layer's saved activations: what gradient checkpointing rebuilds at a time."""
    qk_norm = arch.qk_norm_layers > 0
    kinds = [moe for moe, count in ((True, arch.moe_layers), (False, arch.dense_layers)) if count]
    return max(layer_activation_bytes(arch, setup, moe, qk_norm) for moe in kinds)


def activation_bytes(arch: Architecture, setup: Setup) -> int:
    """What the forward pass saves: every layer's activations, or with checkpointing each layer's input."""
    final_norm_and_head_input = setup.tokens * (2 * arch.hidden + 1) * setup.compute_bytes
    if setup.gradient_checkpointing:
        return arch.layers * setup.tokens * arch.hidden * setup.compute_bytes + final_norm_and_head_input
    qk_norm = arch.qk_norm_layers * setup.tokens * (arch.q_width + arch.kv_width + arch.heads + arch.kv_heads)
    layers = arch.dense_layers * layer_activation_bytes(arch, setup)
    layers += arch.moe_layers * layer_activation_bytes(arch, setup, moe=True)
    return layers + qk_norm * setup.compute_bytes + final_norm_and_head_input


def _dropout_per_layer(arch: Architecture, setup: Setup) -> int:
    if setup.method == "full" or setup.lora_dropout <= 0:
        return 0
    inputs = sum(fan_in * count for fan_in, _, count in adapted_linears(arch, setup.lora_targets))
    return inputs * (setup.compute_bytes + 1) // arch.layers


def loss_bytes(arch: Architecture, setup: Setup) -> int:
    """The loss computation's working memory at its peak (its backward)."""
    head_weight_gradient = arch.vocab * arch.hidden * 4 if setup.method == "full" else 0
    scored = max(1, round(setup.tokens * setup.answer_share))
    if setup.loss == "answer":  # llamatailor's: answer positions only, in chunks
        chunk = min(scored, chunk_rows(arch.vocab)) * arch.vocab * 4
        return (
            round(ANSWER_LOSS_CHUNKS * chunk)
            + 2 * scored * arch.hidden * setup.compute_bytes
            + head_weight_gradient
        )
    if setup.loss == "logits":  # the plain head: fp32 logits of every token, and their gradient
        return 2 * setup.tokens * arch.vocab * 4
    if setup.loss == "chunked":  # torchtune's chunked cross-entropy: bf16 logits kept, one fp32 chunk
        return setup.tokens * arch.vocab * setup.compute_bytes + setup.tokens // 8 * arch.vocab * 4
    vocab_tile = min(arch.vocab, VOCAB_TILE)
    if setup.device == "cpu":
        tile = min(setup.tokens, TOKEN_TILE) * vocab_tile * 4
        return round(CPU_LOSS_TILES * tile) + setup.tokens * arch.hidden * 4
    tile = min(scored, TOKEN_TILE) * vocab_tile * setup.compute_bytes
    return GPU_LOSS_TILES * tile + scored * arch.hidden * 4 + head_weight_gradient


def estimate(arch: Architecture, setup: Setup) -> Breakdown:
    """Peak training memory per device, term by term (see the module docstring for each term's source).

    Args:
        arch: The model's shape.
        setup: Method, shapes (`seq_len` tokens x `micro_batch` rows per pass), precision, optimizer,
            adapter, quantization, sharding over `gpus`, device and loss implementation.

    Returns:
        Breakdown in bytes per device (`total` is the estimated peak, what
        `torch.cuda.max_memory_allocated` reports), with the trainable parameter count, the weights part by
        part (`weight_terms`, plus the adapters' own weights), and the routed experts' LoRA and its
        optimizer states.
    """
    trainable = trainable_parameters(arch, setup)
    expert_adapters = expert_adapter_parameters(arch, setup)
    if setup.method == "full":
        param_bytes = 4 if setup.device == "cpu" else setup.compute_bytes
    else:
        param_bytes = setup.adapter_bytes
    states, bytes_each = OPTIMIZER_STATES[setup.optimizer]
    state_bytes = states * (bytes_each or param_bytes)
    parts = weight_terms(arch, setup)
    if setup.method != "full":  # the adapters' own weights; full fine-tuning trains the base itself
        parts["adapters"] = trainable * param_bytes
    shards = setup.gpus if setup.gpus > 1 and setup.sharding != "none" else 1
    notes = []
    if shards > 1 and setup.sharding in ("zero3", "fsdp"):
        parts = {name: size // shards for name, size in parts.items()}
        parts["two gathered layers"] = 2 * arch.layer_linear_params() // arch.layers * setup.compute_bytes
        notes.append(f"weights sharded over {setup.gpus} GPUs, two layers gathered at a time")
    gradients = trainable * param_bytes // shards
    return Breakdown(
        weights=sum(parts.values()),
        trainable_parameters=trainable,
        gradients=gradients,
        optimizer=trainable * state_bytes // shards,
        activations=activation_bytes(arch, setup),
        recomputed_layer=largest_layer_bytes(arch, setup) if setup.gradient_checkpointing else 0,
        expert_weight_gradient=materialized_expert_bytes(arch, setup),
        logits_and_loss=loss_bytes(arch, setup),
        overhead=OVERHEAD_BYTES[setup.device],
        optimizer_step=gradients
        if setup.device == "cuda"
        else 2 * largest_trainable(arch, setup) * param_bytes,
        weight_terms=parts,
        expert_adapter_parameters=expert_adapters,
        expert_optimizer=expert_adapters * state_bytes // shards,
        notes=notes,
    )
