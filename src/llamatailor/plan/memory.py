"""Peak training memory per device, term by term.

Every term is bytes = count x bytes per element, for one device (GPU, or the CPU process):

* weights: parameters x their bytes. QLoRA stores the layers' linear weights in `bits` bits plus the
  quantization constants: NF4 blocks of 64 weights share one fp32 absmax (0.5 bit/weight), or with double
  quantization an 8-bit absmax plus one fp32 constant per 256 blocks (8/64 + 32/16384 = 0.127 bit/weight)
  [Dettmers et al. 2023, QLoRA, sec. 3]. Embeddings and output head stay unquantized in the compute dtype,
  norms in fp32.
* trainable parameters: LoRA adds r x (in + out) per adapted linear layer [Hu et al. 2021], DoRA one
  magnitude per output feature [Liu et al. 2024]; full fine-tuning trains every weight.
* gradients: one per trainable parameter, in its dtype.
* optimizer states: AdamW keeps two per trainable parameter in its dtype; bitsandbytes' 8-bit AdamW one
  byte each and its 32-bit ones two fp32 states [Dettmers et al. 2022, 8-bit optimizers]; paged variants
  hold the same bytes but may page them to CPU under pressure. ZeRO-2 shards gradients and states over the GPUs; ZeRO-3 / FSDP also the weights,
  plus two layers gathered at a time [Rajbhandari et al. 2020, ZeRO].
* activations: the tensors autograd saves in a forward pass, counted per token and per decoder layer for
  transformers' Llama with SDPA attention (which saves q, k, v, output and log-sum-exp, never the s x s
  scores) [Korthikanti et al. 2022 derive the same kind of count for GPT]; see `layer_activation_elements`.
  Each count was checked exactly against `torch.autograd.graph.saved_tensors_hooks` (tests/test_plan.py).
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

from llamatailor.errors import ConfigError
from llamatailor.hardware import chunk_rows
from llamatailor.plan.architectures import Architecture
from llamatailor.vocabulary import (
    BF16,
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
    bits: Literal[4, 8] = 4
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

    weights: int
    trainable_parameters: int
    gradients: int
    optimizer: int
    activations: int  # saved by the forward pass
    logits_and_loss: int
    overhead: int
    optimizer_step: int = 0
    recomputed_layer: int = 0  # with gradient checkpointing, one layer's activations rebuilt in backward
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        backward_start = self.activations + max(self.logits_and_loss, self.recomputed_layer)
        step_end = self.gradients + self.optimizer_step
        return self.weights + self.optimizer + self.overhead + max(backward_start, step_end)

    def terms(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer states": self.optimizer,
            "activations": self.activations + self.recomputed_layer,
            "logits and loss": self.logits_and_loss,
            "overhead": self.overhead,
        }


def adapted_linears(arch: Architecture, targets: tuple[str, ...]) -> list[tuple[int, int, int]]:
    """(in, out, count over the model) of every linear layer an adapter is put on."""
    found = []
    for name, (fan_in, fan_out) in arch.attention_linears().items():
        if name in targets:
            found.append((fan_in, fan_out, arch.layers))
    for name, (fan_in, fan_out) in arch.mlp_linears(arch.dense_intermediate or arch.intermediate).items():
        if name in targets and arch.dense_layers:
            found.append((fan_in, fan_out, arch.dense_layers))
    if arch.moe_layers:  # adapters on the shared expert; routed experts are fused tensors PEFT leaves alone
        for name, (fan_in, fan_out) in arch.mlp_linears(arch.intermediate).items():
            if name in targets and arch.shared_expert:
                found.append((fan_in, fan_out, arch.moe_layers))
    return found


def trainable_parameters(arch: Architecture, setup: Setup) -> int:
    """Parameters that train: every weight for full fine-tuning; else r x (in + out) per adapted linear
    layer (LoRA, Hu et al. 2021; rsLoRA only rescales) plus one magnitude per output feature with DoRA
    (Liu et al. 2024), as PEFT creates them."""
    if setup.method == "full":
        return arch.total_params()
    count = sum(
        setup.lora_r * (fan_in + fan_out) * n
        for fan_in, fan_out, n in adapted_linears(arch, setup.lora_targets)
    )
    if setup.dora:
        count += sum(fan_out * n for _, fan_out, n in adapted_linears(arch, setup.lora_targets))
    return count


def largest_trainable(arch: Architecture, setup: Setup) -> int:
    """Elements of the largest tensor that trains: the embedding or a weight matrix, or a LoRA factor."""
    if setup.method == "full":
        linears = [*arch.attention_linears().values(), *arch.mlp_linears(arch.intermediate).values()]
        return max(arch.vocab * arch.hidden, *(fan_in * fan_out for fan_in, fan_out in linears))
    adapted = adapted_linears(arch, setup.lora_targets)
    return max((setup.lora_r * max(fan_in, fan_out) for fan_in, fan_out, _ in adapted), default=0)


def weight_bytes(arch: Architecture, setup: Setup) -> int:
    if setup.method != "qlora":
        return arch.total_params() * (4 if setup.device == "cpu" else setup.compute_bytes)
    per_weight = 1.0 if setup.bits == 8 else (4 + (0.127 if setup.double_quant else 0.5)) / 8
    embeddings = arch.embedding_params() * (4 if setup.device == "cpu" else setup.compute_bytes)
    return round(arch.layer_linear_params() * per_weight) + embeddings + arch.norm_params() * 4


def layer_activation_elements(arch: Architecture, setup: Setup) -> int:
    """Elements autograd saves per token in one decoder layer (transformers Llama, SDPA attention).

    Always: each RMSNorm's input and 1/rms (2 x (h + 1)); SDPA's q, k, v, output and log-sum-exp
    (2 x q_width + 2 x kv_width + heads; o_proj reads the output in place, so it adds nothing); SwiGLU's
    gate, silu(gate) and up (3 x I). Then, per weight that trains: each RMSNorm's normalized input (h); the
    input of the q/k/v projections (h, shared) and of gate/up (h, shared), and down_proj's (I); the r-wide
    output of each adapter's A.
    """

    h, q, kv, heads = arch.hidden, arch.q_width, arch.kv_width, arch.heads
    width = arch.active_mlp_width()
    full = setup.method == "full"
    targets = set(LLAMA_LINEARS) if full else set(setup.lora_targets)
    elements = 2 * (h + 1) + 2 * q + 2 * kv + heads + 3 * width
    elements += 2 * h if full else 0
    elements += h if targets & {"q_proj", "k_proj", "v_proj"} else 0
    elements += h if targets & {"gate_proj", "up_proj"} else 0
    elements += width if "down_proj" in targets else 0
    if not full:
        elements += setup.lora_r * len(targets)
    return elements


def layer_activation_bytes(arch: Architecture, setup: Setup) -> int:
    """One decoder layer's saved activations for the whole micro-batch."""
    per_token = layer_activation_elements(arch, setup) * setup.compute_bytes + _dropout_per_layer(arch, setup)
    return setup.tokens * per_token


def activation_bytes(arch: Architecture, setup: Setup) -> int:
    """What the forward pass saves: every layer's activations, or with checkpointing each layer's input."""
    final_norm_and_head_input = setup.tokens * (2 * arch.hidden + 1) * setup.compute_bytes
    if setup.gradient_checkpointing:
        return arch.layers * setup.tokens * arch.hidden * setup.compute_bytes + final_norm_and_head_input
    return arch.layers * layer_activation_bytes(arch, setup) + final_norm_and_head_input


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
        `torch.cuda.max_memory_allocated` reports), with the trainable parameter count.
    """
    trainable = trainable_parameters(arch, setup)
    if setup.method == "full":
        param_bytes = 4 if setup.device == "cpu" else setup.compute_bytes
    else:
        param_bytes = setup.adapter_bytes
    states, bytes_each = OPTIMIZER_STATES[setup.optimizer]
    state_bytes = states * (bytes_each or param_bytes)
    weights = weight_bytes(arch, setup)
    gradients = trainable * param_bytes
    optimizer = trainable * state_bytes
    notes = []
    if setup.gpus > 1 and setup.sharding != "none":
        optimizer //= setup.gpus
        gradients //= setup.gpus
        if setup.sharding in ("zero3", "fsdp"):
            gathered = 2 * arch.layer_linear_params() // arch.layers * setup.compute_bytes
            weights = weights // setup.gpus + gathered
            notes.append(f"weights sharded over {setup.gpus} GPUs, two layers gathered at a time")
    return Breakdown(
        weights=weights,
        trainable_parameters=trainable,
        gradients=gradients,
        optimizer=optimizer,
        activations=activation_bytes(arch, setup),
        recomputed_layer=layer_activation_bytes(arch, setup) if setup.gradient_checkpointing else 0,
        logits_and_loss=loss_bytes(arch, setup),
        overhead=OVERHEAD_BYTES[setup.device],
        optimizer_step=gradients
        if setup.device == "cuda"
        else 2 * largest_trainable(arch, setup) * param_bytes,
        notes=notes,
    )
