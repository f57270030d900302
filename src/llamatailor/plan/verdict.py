"""The planner's verdict: which methods fit a device, how far batch and sequence can go, what to do."""

from dataclasses import dataclass, field, replace
from typing import Any

from llamatailor.plan.architectures import PRESETS, Architecture
from llamatailor.plan.inference import (
    INFERENCE_BITS,
    INFERENCE_CONTEXT,
    InferenceBreakdown,
    inference_estimate,
)
from llamatailor.plan.memory import GIB, Breakdown, Setup, estimate

GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
MAX_SEQ_LEN = 131072


@dataclass(frozen=True)
class MethodFit:
    label: str
    setup: Setup
    breakdown: Breakdown
    fits: bool
    max_micro_batch: int  # at the planned sequence length; 0 when even one sequence does not fit
    max_seq_len: int  # at the planned micro-batch; 0 when none fits
    gpus_needed: int | None  # with FSDP full sharding, at the planned shapes; None beyond 64


@dataclass(frozen=True)
class InferenceFit:
    breakdown: InferenceBreakdown
    fits: bool
    gpus_needed: int | None  # such devices holding the weights and cache between them; None beyond 64


@dataclass(frozen=True)
class Plan:
    arch: Architecture
    setup: Setup
    memory: int  # bytes available per device
    methods: list[MethodFit]
    recommended: str | None
    advice: list[str] = field(default_factory=list)
    inference: list[InferenceFit] = field(default_factory=list)  # weights at 4, 8 and 16 bits


def fits(arch: Architecture, setup: Setup, memory: int) -> bool:
    return estimate(arch, setup).total <= memory


def largest(arch: Architecture, setup: Setup, memory: int, name: str, upper: int, step: int = 1) -> int:
    """The largest value of `name` (a monotone size) that still fits, by bisection; 0 if none."""
    if not fits(arch, _resized(setup, name, step), memory):
        return 0
    low, high = 1, upper // step
    while low < high:
        middle = (low + high + 1) // 2
        if fits(arch, _resized(setup, name, middle * step), memory):
            low = middle
        else:
            high = middle - 1
    return low * step


def _resized(setup: Setup, name: str, size: int) -> Setup:
    changes: dict[str, Any] = {name: size}  # `name` is one of Setup's int fields, chosen at run time
    return replace(setup, **changes)


def gpus_needed(arch: Architecture, setup: Setup, memory: int) -> int | None:
    for count in GPU_COUNTS:
        sharded = replace(setup, gpus=count, sharding="fsdp" if count > 1 else "none")
        if fits(arch, sharded, memory):
            return count
    return None


def method_fit(arch: Architecture, label: str, setup: Setup, memory: int) -> MethodFit:
    breakdown = estimate(arch, setup)
    return MethodFit(
        label=label,
        setup=setup,
        breakdown=breakdown,
        fits=breakdown.total <= memory,
        max_micro_batch=largest(arch, setup, memory, "micro_batch", 4096),
        max_seq_len=largest(arch, setup, memory, "seq_len", MAX_SEQ_LEN, step=128),
        gpus_needed=gpus_needed(arch, replace(setup, gpus=1, sharding="none"), memory),
    )


def inference_fits(arch: Architecture, setup: Setup, memory: int, context: int) -> list[InferenceFit]:
    """Serving `arch` at each of INFERENCE_BITS with `context` tokens of KV cache for one sequence: whether
    it fits one device of `memory` bytes, and how many such devices hold it (weights and cache split
    evenly, as tensor parallelism does; None beyond 64)."""
    fits_list = []
    for bits in INFERENCE_BITS:
        breakdown = inference_estimate(arch, bits, context, setup.compute_bytes, device=setup.device)
        shared = breakdown.weights + breakdown.kv_cache
        needed = next((n for n in GPU_COUNTS if shared / n + breakdown.overhead <= memory), None)
        fits_list.append(InferenceFit(breakdown, breakdown.total <= memory, needed))
    return fits_list


def make_plan(
    arch: Architecture, setup: Setup, memory: int, inference_context: int = INFERENCE_CONTEXT
) -> Plan:
    """Every method on these shapes; LoRA is recommended where it fits (near full quality, a fraction of the
    memory), QLoRA where only it fits, full fine-tuning where only the user's own choice was full. Then
    serving: the weights at 4, 8 and 16 bits with the KV cache of `inference_context` tokens.

    Args:
        arch: The model's shape.
        setup: The planned run (its `method` is the user's choice).
        memory: Bytes available per device.
        inference_context: Tokens of KV cache the inference rows hold (one sequence).

    Returns:
        Plan: per method (full, lora, qlora) its `estimate`, whether it fits, the largest micro-batch
        (rows) and sequence length (tokens, in steps of 128) that fit, and the GPUs it needs with FSDP
        full sharding (None beyond 64); the recommended method (None when none fits), advice lines, and
        per weight width the inference estimate, whether it fits and the devices it needs.
    """
    methods = [
        method_fit(arch, method, replace(setup, method=method), memory)
        for method in ("full", "lora", "qlora")
    ]
    by_label = {fit.label: fit for fit in methods}
    preference = ["full", "lora", "qlora"] if setup.method == "full" else ["lora", "qlora", "full"]
    if arch.experts and setup.expert_bits is not None:
        preference.remove("qlora")  # quantized experts are Axolotl's way: llamatailor's trainer cannot run it
    recommended = next((label for label in preference if by_label[label].fits), None)
    lines = advice(arch, setup, memory, by_label, recommended) + expert_advice(
        arch, by_label["qlora"], memory
    )
    inference = inference_fits(arch, setup, memory, inference_context)
    return Plan(arch, setup, memory, methods, recommended, lines, inference)


def expert_advice(arch: Architecture, qlora: MethodFit, memory: int) -> list[str]:
    """For a MoE model whose QLoRA keeps the routed experts in the compute dtype (llamatailor's trainer):
    what they weigh, and what QLoRA would need with them linearized to 4 bits, as Axolotl does."""
    if not arch.experts:
        return []
    if qlora.setup.expert_bits is not None:
        verdict = "fits" if qlora.fits else "does not fit"
        return [
            f"The qlora column plans the routed experts at {qlora.setup.expert_bits} bits, as Axolotl's linearized "
            f"experts ({verdict}); llamatailor's own QLoRA keeps them in {qlora.setup.precision}, so it is not "
            "recommended here. Without --expert-bits the plan is llamatailor's."
        ]
    experts = qlora.breakdown.weight_terms.get("routed experts", 0)
    linearized = estimate(arch, replace(qlora.setup, expert_bits=4)).total
    verdict = "fits" if linearized <= memory else "does not fit either"
    return [
        f"qlora keeps the routed experts in {qlora.setup.precision} ({experts / GIB:.1f} GiB): bitsandbytes "
        "quantizes nn.Linear layers only, and transformers fuses each layer's experts into 3-D parameters.",
        f"With the experts linearized to 4 bits, as Axolotl does (--expert-bits 4 plans it), qlora would need "
        f"{linearized / GIB:.1f} GiB per device and {verdict}; llamatailor does not train that way.",
    ]


def advice(
    arch: Architecture, setup: Setup, memory: int, by_label: dict[str, MethodFit], recommended: str | None
) -> list[str]:
    lines = []
    gib = memory / GIB
    chosen = by_label[setup.method]
    if not chosen.fits:
        lines.append(
            f"{setup.method} of {arch.name} needs {chosen.breakdown.total / GIB:.1f} GiB per device at sequence "
            f"{setup.seq_len} and micro-batch {setup.micro_batch}; {gib:.1f} GiB are available."
        )
    if recommended is None:
        # with --expert-bits, qlora is Axolotl's (expert_advice says so), not a way to run llamatailor
        trainable = (
            ("lora", "full") if arch.experts and setup.expert_bits is not None else ("qlora", "lora", "full")
        )
        for label in trainable:
            needed = by_label[label].gpus_needed
            if needed:
                lines.append(f"{label} fits on {needed} such GPUs with FSDP (or ZeRO-3) full sharding.")
        qlora = replace(by_label["qlora"].setup, expert_bits=None)
        smaller = [
            name
            for name, other in PRESETS.items()
            if other.total_params() < arch.total_params() and fits(other, qlora, memory)
        ]
        if smaller:
            largest_fitting = max(smaller, key=lambda name: PRESETS[name].total_params())
            lines.append(
                f"On one {gib:.0f} GiB device, QLoRA of {largest_fitting} fits at these shapes (and smaller presets)."
            )
    elif recommended != setup.method:
        lines.append(f"{recommended} fits: set train.method: {recommended}.")
    if chosen.max_micro_batch and chosen.max_micro_batch < setup.micro_batch:
        lines.append(
            f"{setup.method} fits with micro-batch {chosen.max_micro_batch}; raise grad_accum to keep the batch."
        )
    if not setup.gradient_checkpointing and not chosen.fits:
        with_checkpointing = replace(setup, gradient_checkpointing=True)
        if fits(arch, with_checkpointing, memory):
            lines.append(f"{setup.method} fits with gradient checkpointing on.")
    return lines


def plan_as_dict(plan: Plan) -> dict:
    """The plan for `--json`: bytes, and the same in GiB for reading.

    Returns:
        A JSON-ready dict: model name, parameter count and active parameters, device, memory per device
        (GiB), the setup's fields, per method `fits`, `total_bytes`/`total_gib`, `terms_bytes` (weights,
        gradients, optimizer states, activations, logits and loss, overhead), `weight_terms_bytes`
        (attention, routed experts, MLPs, router, embeddings and head, norms, adapters), trainable
        parameters and those of the routed experts' LoRA with its optimizer states, `max_micro_batch`,
        `max_seq_len` and `gpus_needed_with_fsdp`; `recommended`, `advice`; `inference` per weight width
        (4-bit, 8-bit, 16-bit): context, weights, KV cache, overhead, total, `fits`, `gpus_needed`.
    """
    return {
        "model": plan.arch.name,
        "parameters": plan.arch.total_params(),
        "active_parameters": plan.arch.active_params(),
        "device": plan.setup.device,
        "memory_per_device_gib": round(plan.memory / GIB, 2),
        "setup": {key: getattr(plan.setup, key) for key in plan.setup.__dataclass_fields__},
        "methods": {
            fit.label: {
                "fits": fit.fits,
                "total_bytes": fit.breakdown.total,
                "total_gib": round(fit.breakdown.total / GIB, 2),
                "terms_bytes": fit.breakdown.terms(),
                "weight_terms_bytes": fit.breakdown.weight_terms,
                "trainable_parameters": fit.breakdown.trainable_parameters,
                "expert_adapter_parameters": fit.breakdown.expert_adapter_parameters,
                "expert_adapter_optimizer_bytes": fit.breakdown.expert_optimizer,
                "max_micro_batch": fit.max_micro_batch,
                "max_seq_len": fit.max_seq_len,
                "gpus_needed_with_fsdp": fit.gpus_needed,
            }
            for fit in plan.methods
        },
        "recommended": plan.recommended,
        "advice": plan.advice,
        "inference": {
            f"{fit.breakdown.bits}-bit": {
                "context_tokens": fit.breakdown.context,
                "weights_bytes": fit.breakdown.weights,
                "kv_cache_bytes": fit.breakdown.kv_cache,
                "overhead_bytes": fit.breakdown.overhead,
                "total_bytes": fit.breakdown.total,
                "total_gib": round(fit.breakdown.total / GIB, 2),
                "fits": fit.fits,
                "gpus_needed": fit.gpus_needed,
            }
            for fit in plan.inference
        },
    }
