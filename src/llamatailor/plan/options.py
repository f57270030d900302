"""From command-line options (and an optional run file) to a plan."""

from dataclasses import replace
from typing import Any

import torch

from llamatailor.config import RunConfig
from llamatailor.errors import ConfigError
from llamatailor.hardware import available_memory
from llamatailor.plan.architectures import base_architecture, load_architecture
from llamatailor.plan.inference import INFERENCE_CONTEXT
from llamatailor.plan.memory import GIB, Setup
from llamatailor.plan.run_setup import setup_from_config
from llamatailor.plan.verdict import Plan, make_plan
from llamatailor.vocabulary import (
    EXPERTS,
    FP32,
    LLAMA_LINEARS,
    LORA_TARGET_PRESETS,
    METHODS,
    OPTIMIZERS,
    SHARDINGS,
    lora_linears,
)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"--{name.replace('_', '-')} {value!r}: expected one of {', '.join(allowed)}")
    return value


def build_plan(
    config: RunConfig | None,
    *,
    model: str | None,
    gpu_mem_gib: float | None,
    gpus: int,
    sharding: str,
    inference_context: int | None = None,
    **options: str | int | bool | None,
) -> Plan:
    """The `plan` verb: a model's shape and a setup, with command-line overrides, to `make_plan`.

    Args:
        config: A run file, whose model and train section give the setup; None: `model` and defaults.
        model: A preset, a model folder or a cached hub id (overrides the run file's base).
        gpu_mem_gib: Memory per GPU in GiB; given, the plan is for CUDA even on a machine without one.
            None: this machine's GPU memory, or its available RAM (then fp32 on CPU).
        gpus: Devices.
        sharding: none, zero2, zero3 or fsdp.
        inference_context: Tokens of KV cache for the inference rows; None: INFERENCE_CONTEXT.
        options: method, optimizer, lora_targets, bits, expert_bits (QLoRA's routed experts: 4 or 8 as
            Axolotl's linearized experts), seq_len (tokens), micro_batch (rows), lora_r, expert_r and
            checkpointing, each None to keep the setup's value.

    Returns:
        The Plan (see `verdict.make_plan`).

    Raises:
        ConfigError: neither a run file nor `model`, an option outside its allowed values, or experts
            options (`--lora-targets experts`, `--expert-bits`, `--expert-r`) for a model without them.
        ModelLoadError: no architecture for the model (`load_architecture`).
    """
    if config is not None:
        arch = load_architecture(model) if model else base_architecture(config.model.base)
        setup = setup_from_config(config, arch)
    elif model is None:
        raise ConfigError("plan needs --model (a preset, a model folder or a cached hub id) or a run file")
    else:
        arch = load_architecture(model)
        setup = Setup()
    cuda = torch.cuda.is_available() or gpu_mem_gib is not None
    setup = replace(setup, device="cuda" if cuda else "cpu", precision=setup.precision if cuda else FP32)
    setup = replace(setup, **_changes(options, sharding, gpus))
    if not arch.experts and (setup.lora_experts or setup.expert_bits or options.get("expert_r")):
        raise ConfigError(
            f"{arch.name} has no routed experts: --lora-targets experts, --expert-bits and --expert-r plan a "
            "Mixture-of-Experts model's experts (Llama 4)"
        )
    memory = int(gpu_mem_gib * GIB) if gpu_mem_gib is not None else available_memory()
    return make_plan(arch, setup, memory, inference_context or INFERENCE_CONTEXT)


def _changes(options: dict[str, str | int | bool | None], sharding: str, gpus: int) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if options.get("method") is not None:
        changes["method"] = _choice("method", str(options["method"]), METHODS)
    if options.get("optimizer") is not None:
        changes["optimizer"] = _choice("optimizer", str(options["optimizer"]), OPTIMIZERS)
    changes["sharding"] = _choice("sharding", sharding, SHARDINGS)
    targets = options.get("lora_targets")
    if targets is not None:
        changes["lora_targets"] = _lora_targets(str(targets))
        changes["lora_experts"] = targets == EXPERTS
    for name in ("bits", "expert_bits"):
        if options.get(name) is not None:
            changes[name] = int(_choice(name, str(options[name]), ("4", "8")))
    for name in ("seq_len", "micro_batch", "lora_r", "expert_r"):
        size = options.get(name)
        if size is not None:
            changes[name] = int(size)
    if options.get("checkpointing") is not None:
        changes["gradient_checkpointing"] = bool(options["checkpointing"])
    changes["gpus"] = gpus
    return changes


def _lora_targets(text: str) -> tuple[str, ...]:
    """A preset, or comma-separated names of linear layers the planner counts (anything else would count
    as no adapter at all). Raises ConfigError naming the first unknown name, the presets and the layers."""
    if text in LORA_TARGET_PRESETS:
        return lora_linears(text)
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in LLAMA_LINEARS]
    if unknown:
        raise ConfigError(
            f"--lora-targets {text!r}: {unknown[0]!r} is neither a preset ({', '.join(LORA_TARGET_PRESETS)}) "
            f"nor a linear layer the planner counts ({', '.join(LLAMA_LINEARS)})"
        )
    return names
