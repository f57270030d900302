"""From command-line options (and an optional run file) to a plan."""

from dataclasses import replace
from typing import get_args

import psutil
import torch

from llamatailor.config import RunConfig
from llamatailor.errors import ConfigError
from llamatailor.models.source import resolve_source
from llamatailor.plan.architectures import load_architecture
from llamatailor.plan.memory import GIB, TARGET_PRESETS, Method, Optimizer, Setup, Sharding
from llamatailor.plan.run_setup import setup_from_config
from llamatailor.plan.verdict import Plan, make_plan


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"--{name.replace('_', '-')} {value!r}: expected one of {', '.join(allowed)}")
    return value


def build_plan(
    config: RunConfig | None, *, model: str | None, gpu_mem_gib: float | None, **options: object
) -> Plan:
    if config is not None:
        arch = load_architecture(model or resolve_source(config.model.base).location)
        setup = setup_from_config(config, arch)
    elif model is None:
        raise ConfigError("plan needs --model (a preset, a model folder or a cached hub id) or a run file")
    else:
        arch = load_architecture(model)
        setup = Setup()
    cuda = torch.cuda.is_available() or gpu_mem_gib is not None
    setup = replace(setup, device="cuda" if cuda else "cpu", precision=setup.precision if cuda else "fp32")
    setup = replace(setup, **_changes(options))
    if gpu_mem_gib is not None:
        memory = int(gpu_mem_gib * GIB)
    elif torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory
    else:
        memory = psutil.virtual_memory().available
    return make_plan(arch, setup, memory)


def _changes(options: dict[str, object]) -> dict[str, object]:
    changes: dict[str, object] = {}
    if options.get("method") is not None:
        changes["method"] = _choice("method", str(options["method"]), get_args(Method))
    if options.get("optimizer") is not None:
        changes["optimizer"] = _choice("optimizer", str(options["optimizer"]), get_args(Optimizer))
    changes["sharding"] = _choice("sharding", str(options["sharding"]), get_args(Sharding))
    targets = options.get("lora_targets")
    if targets is not None:
        changes["lora_targets"] = TARGET_PRESETS.get(str(targets)) or tuple(str(targets).split(","))
    if options.get("bits") is not None:
        changes["bits"] = int(_choice("bits", str(options["bits"]), ("4", "8")))
    for name in ("seq_len", "micro_batch", "lora_r"):
        if options.get(name) is not None:
            changes[name] = int(options[name])  # type: ignore[call-overload]
    if options.get("checkpointing") is not None:
        changes["gradient_checkpointing"] = bool(options["checkpointing"])
    changes["gpus"] = int(options["gpus"])  # type: ignore[call-overload]
    return changes
