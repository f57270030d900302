"""The planner's verdict: which methods fit a device, how far batch and sequence can go, what to do."""

from dataclasses import dataclass, field, replace
from typing import Any

from llamatailor.plan.architectures import PRESETS, Architecture
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
class Plan:
    arch: Architecture
    setup: Setup
    memory: int  # bytes available per device
    methods: list[MethodFit]
    recommended: str | None
    advice: list[str] = field(default_factory=list)


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


def make_plan(arch: Architecture, setup: Setup, memory: int) -> Plan:
    """Every method on these shapes; LoRA is recommended where it fits (near full quality, a fraction of the
    memory), QLoRA where only it fits, full fine-tuning where only the user's own choice was full.

    Args:
        arch: The model's shape.
        setup: The planned run (its `method` is the user's choice).
        memory: Bytes available per device.

    Returns:
        Plan: per method (full, lora, qlora) its `estimate`, whether it fits, the largest micro-batch
        (rows) and sequence length (tokens, in steps of 128) that fit, and the GPUs it needs with FSDP
        full sharding (None beyond 64); the recommended method (None when none fits) and advice lines.
    """
    methods = [
        method_fit(arch, method, replace(setup, method=method), memory)
        for method in ("full", "lora", "qlora")
    ]
    by_label = {fit.label: fit for fit in methods}
    preference = ["full", "lora", "qlora"] if setup.method == "full" else ["lora", "qlora", "full"]
    recommended = next((label for label in preference if by_label[label].fits), None)
    return Plan(arch, setup, memory, methods, recommended, advice(arch, setup, memory, by_label, recommended))


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
        for label in ("qlora", "lora", "full"):
            needed = by_label[label].gpus_needed
            if needed:
                lines.append(f"{label} fits on {needed} such GPUs with FSDP (or ZeRO-3) full sharding.")
        qlora = by_label["qlora"].setup
        smaller = [
            name for name, other in PRESETS.items() if other is not arch and fits(other, qlora, memory)
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
        A JSON-ready dict: model name and parameter count, device, memory per device (GiB), the setup's
        fields, per method `fits`, `total_bytes`/`total_gib`, `terms_bytes` (weights, gradients,
        optimizer states, activations, logits and loss, overhead), trainable parameters,
        `max_micro_batch`, `max_seq_len` and `gpus_needed_with_fsdp`; `recommended` and `advice`.
    """
    return {
        "model": plan.arch.name,
        "parameters": plan.arch.total_params(),
        "device": plan.setup.device,
        "memory_per_device_gib": round(plan.memory / GIB, 2),
        "setup": {key: getattr(plan.setup, key) for key in plan.setup.__dataclass_fields__},
        "methods": {
            fit.label: {
                "fits": fit.fits,
                "total_bytes": fit.breakdown.total,
                "total_gib": round(fit.breakdown.total / GIB, 2),
                "terms_bytes": fit.breakdown.terms(),
                "trainable_parameters": fit.breakdown.trainable_parameters,
                "max_micro_batch": fit.max_micro_batch,
                "max_seq_len": fit.max_seq_len,
                "gpus_needed_with_fsdp": fit.gpus_needed,
            }
            for fit in plan.methods
        },
        "recommended": plan.recommended,
        "advice": plan.advice,
    }
