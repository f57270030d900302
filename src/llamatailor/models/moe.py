"""Mixture-of-Experts layouts: which models have routed experts, where their fused parameters are, and how a
LoRA on them is sized. Llama 4's layout is the only one llamatailor knows; any other MoE model is refused.

Llama 4 (transformers' `Llama4TextMoe`, every `interleave_moe_layer_step`-th layer): the routed experts are two
fused parameters of `Llama4TextExperts`, `feed_forward.experts.gate_up_proj` (E, hidden, 2·I; the gate is
the first half of the last dim) and `feed_forward.experts.down_proj` (E, I, hidden), E = `num_local_experts`;
the router `feed_forward.router` is an `nn.Linear` subclass and is never adapted; the shared expert and the
dense layers' MLPs are ordinary gate/up/down linear layers (all-linear covers them). PEFT 0.21 adapts a fused
parameter through `LoraConfig.target_parameters` (its `ParamWrapper`), one rank-r adapter per expert.

Config values are read from a config.json as parsed (or `PretrainedConfig.to_dict()`); a multimodal Llama 4
config keeps the text model's keys under `text_config`.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamatailor.config import LoraSection, RunConfig
from llamatailor.errors import ConfigError, ModelLoadError
from llamatailor.vocabulary import AUTO, EXPERTS


@dataclass(frozen=True)
class MoeLayout:
    """Where a Mixture-of-Experts family keeps its routed experts."""

    model_types: tuple[str, ...]  # config.json `model_type` values with this layout
    expert_count_key: str  # the config key holding E, the routed experts per MoE layer
    # Suffixes of the fused expert parameters' names, dim 0 the expert (PEFT's target_parameters)
    expert_parameters: tuple[str, ...]
    router: str  # suffix of the router's module name

    def expert_count(self, config: Mapping[str, Any]) -> int:
        """E, the routed experts per MoE layer of a model with this layout (0 where the key is absent)."""
        return int(text_config(config).get(self.expert_count_key) or 0)


LLAMA4 = MoeLayout(
    model_types=("llama4", "llama4_text"),
    expert_count_key="num_local_experts",
    expert_parameters=("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"),
    router="feed_forward.router",
)
# Expert-count keys of MoE families llamatailor does not support, named first when refusing one.
OTHER_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass(frozen=True)
class ExpertAdapter:
    """The LoRA on a model's routed experts: `rank` per expert on each fused parameter."""

    parameters: tuple[str, ...]  # PEFT target_parameters (name suffixes)
    experts: int  # E
    rank: int  # per expert: each parameter gets E adapters of this rank


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The text model's keys: a multimodal config's `text_config`, else the config itself."""
    nested = config.get("text_config")
    return nested if isinstance(nested, Mapping) else config


def moe_layout(config: Mapping[str, Any]) -> MoeLayout | None:
    """The routed-expert layout of a model, from its config; None for a model without routed experts.

    Args:
        config: The model's config.json, parsed (or `PretrainedConfig.to_dict()`).

    Returns:
        LLAMA4 for a Llama 4 config with at least one routed expert; None when no key names experts.

    Raises:
        ModelLoadError: the config has routed experts (a key containing "expert" with a set value) but is not
            Llama 4: Mixtral, Qwen2/3-MoE, DeepSeek and the like; the message names its model_type and key.
    """
    model_type = str(config.get("model_type", ""))
    if model_type in LLAMA4.model_types:
        return LLAMA4 if LLAMA4.expert_count(config) else None
    key = _expert_key(config) or _expert_key(text_config(config))
    if key is None:
        return None
    raise ModelLoadError(
        f"model.base: this model has routed experts (model_type {model_type or 'unknown'!r}, "
        f"{key}: {text_config(config).get(key, config.get(key))!r}), but llamatailor supports only Llama 4's "
        f"Mixture-of-Experts layout (model_type {' or '.join(LLAMA4.model_types)}); its training, merge and "
        "export would not know where this model's experts are"
    )


def _expert_key(config: Mapping[str, Any]) -> str | None:
    """The first key naming experts that has a value (a known count key first), or None."""
    named = [key for key in config if "expert" in key.lower() and config[key] not in (None, 0, False, [], {})]
    return next((key for key in OTHER_EXPERT_KEYS if key in named), named[0] if named else None)


def expert_rank(lora: LoraSection, experts: int) -> int:
    """The LoRA rank per routed expert: `train.lora.expert_r`, or for auto max(1, r // E), the common rule
    that keeps an expert parameter's E adapters at about the parameters of one rank-r adapter."""
    return max(1, lora.r // experts) if lora.expert_r == AUTO else int(lora.expert_r)


def expert_adapter(lora: LoraSection, config: Mapping[str, Any]) -> ExpertAdapter | None:
    """What `train.lora` adapts of a model's routed experts: with `targets: experts`, every fused expert
    parameter at `expert_rank`; None for any other targets (the experts stay frozen).

    Args:
        lora: The run's `train.lora` section.
        config: The model's config.json, parsed (or `PretrainedConfig.to_dict()`).

    Raises:
        ConfigError: `targets: experts` on a model without routed experts.
        ModelLoadError: the model's experts are not in Llama 4's layout (`moe_layout`).
    """
    layout = moe_layout(config)
    if lora.targets != EXPERTS:
        return None
    if layout is None:
        model_type = config.get("model_type", "unknown")
        raise ConfigError(
            f"train.lora.targets: experts adapts a Mixture-of-Experts model's routed experts, but this model "
            f"(model_type {model_type!r}) has no routed experts; use all-linear"
        )
    experts = layout.expert_count(config)
    return ExpertAdapter(layout.expert_parameters, experts, expert_rank(lora, experts))


def is_expert_parameter(name: str, layout: MoeLayout) -> bool:
    """Whether a parameter's full name is one of the layout's fused experts, by PEFT's rule for
    target_parameters (the name, or a suffix after a dot)."""
    return any(name == suffix or name.endswith(f".{suffix}") for suffix in layout.expert_parameters)


def check_run_model(config: RunConfig) -> None:
    """The train stage's check before anything is loaded or written: the base's config.json, where it is on
    this machine (a model folder, or a hub id in the Hugging Face cache), has no routed experts in a layout
    other than Llama 4's, and has routed experts if `train.lora.targets` is experts (`expert_adapter`). A
    base whose config.json is not here yet (a hub id to download, a GGUF file, the embedded model: dense
    Llamas) is checked by the trainer once loaded.

    Raises:
        ConfigError: `targets: experts` on a model without routed experts.
        ModelLoadError: routed experts in a layout other than Llama 4's.
    """
    path = local_config_json(config.model.base)
    if path is None:
        return
    model_config = json.loads(path.read_text(encoding="utf-8"))
    if config.train.method == "full":
        moe_layout(model_config)
    else:
        expert_adapter(config.train.lora, model_config)


def local_config_json(spec: str) -> Path | None:
    """config.json of `model.base` where it is on this machine without a download: a folder's, or a hub id's
    in the Hugging Face cache; None otherwise."""
    folder = Path(spec).expanduser()
    if (folder / "config.json").is_file():
        return folder / "config.json"
    if "/" not in spec or folder.exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json")
    return Path(cached) if isinstance(cached, str) else None
