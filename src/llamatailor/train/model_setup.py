"""The model a training run updates: an adapter (LoRA, DoRA, rsLoRA) on a full-precision base, the same on
a 4- or 8-bit base (QLoRA), or every weight (full fine-tuning). On a Llama 4 model, `targets: experts` also
puts an adapter on each routed expert (`models.moe`)."""

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PreTrainedModel

from llamatailor.config import LoraSection, QuantizationSection, RunConfig
from llamatailor.hardware import use_gradient_checkpointing
from llamatailor.models.families import Family
from llamatailor.models.loading import ChatTokenizer, load_base_model, torch_dtype
from llamatailor.models.moe import expert_adapter, is_expert_parameter, moe_layout
from llamatailor.vocabulary import AUTO, FP32, Precision

log = logging.getLogger(__name__)


def lora_config(
    lora: LoraSection, family: Family, model_config: Mapping[str, Any] | None = None
) -> LoraConfig:
    """PEFT's LoraConfig for the run's lora section; all-linear means the family's linear layers.

    With `targets: experts` the routed experts of the model described by `model_config` (its config.json,
    parsed; None: a model without experts) are adapted too, through PEFT's `target_parameters`, at rank
    `moe.expert_rank` per expert (PEFT's `rank_pattern`). alpha stays the same: PEFT scales each expert's
    update by alpha / expert rank (alpha / sqrt(rank) with rsLoRA), the rule that makes the update's size
    independent of the rank, so `alpha` means for an expert what it means for a linear layer.

    Raises:
        ConfigError: an unknown target preset; `targets: experts` on a model without routed experts.
        ModelLoadError: routed experts in a layout other than Llama 4's (`moe.moe_layout`).
    """
    experts = expert_adapter(lora, model_config or {})
    on_experts: dict[str, Any] = {}
    if experts is not None:
        on_experts = {
            "target_parameters": list(experts.parameters),
            # PEFT reads rank_pattern keys as regular expressions matched at the end of a name
            "rank_pattern": {re.escape(name): experts.rank for name in experts.parameters},
        }
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.linears(family.lora_targets)),
        use_dora=lora.dora,
        use_rslora=lora.rslora,
        task_type="CAUSAL_LM",
        **on_experts,
    )


def quantization_config(quantization: QuantizationSection, precision: Precision) -> BitsAndBytesConfig:
    dtype_name = precision if quantization.compute_dtype == AUTO else quantization.compute_dtype
    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(dtype_name),
    )


def quantized_base(config: RunConfig, precision: Precision) -> PreTrainedModel:
    """The 4/8-bit base, prepared for adapter training. PEFT's preparation casts every unquantized weight to
    fp32; the embeddings and output head go back to the compute dtype, as in the QLoRA reference code: in
    fp32 they would take 8 GB more on a Llama 3 70B. Norms stay fp32 (tiny, and better for stability).

    bitsandbytes quantizes linear layers only: a Llama 4's routed experts (fused 3-D parameters) stay in the
    compute dtype, and are kept out of the fp32 cast altogether (Scout's ~97B expert weights would need
    twice their memory, even for a moment).

    Raises:
        ModelLoadError: the base cannot be loaded, or has routed experts in a layout other than Llama 4's.
    """
    dtype = torch_dtype(precision)
    base = load_base_model(
        config.model, dtype, quantization=quantization_config(config.train.quantization, precision)
    )
    layout = moe_layout(base.config.to_dict())
    experts = (
        []
        if layout is None
        else [name for name, _ in base.named_parameters() if is_expert_parameter(name, layout)]
    )
    with _set_aside(base, experts):
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=use_gradient_checkpointing(config.train.gradient_checkpointing)
        )
    for module in (base.get_input_embeddings(), base.get_output_embeddings()):
        module.to(dtype)
    if experts:
        log.info(
            "The routed experts stay in %s (not quantized): bitsandbytes quantizes linear layers only.",
            str(dtype).removeprefix("torch."),
        )
    return base


@contextlib.contextmanager
def _set_aside(model: torch.nn.Module, names: list[str]) -> Iterator[None]:
    """Parameters `names` of `model` unregistered (so unseen by `model.parameters()`) and frozen, then put back."""
    held = []
    for name in names:
        owner, _, attribute = name.rpartition(".")
        module = model.get_submodule(owner)
        held.append((module, attribute, module._parameters.pop(attribute).requires_grad_(False)))
    try:
        yield
    finally:
        for module, attribute, param in held:
            module._parameters[attribute] = param


def trainable_model(
    config: RunConfig, chat: ChatTokenizer, precision: Precision
) -> PeftModel | PreTrainedModel:
    """The model with exactly the weights the method trains set to require gradients.

    Raises:
        ConfigError: `train.lora` asks for what this model lacks (`lora_config`).
        ModelLoadError: the base cannot be loaded, or has routed experts in a layout other than Llama 4's.
    """
    train = config.train
    # On GPUs the frozen base is kept in the compute dtype; autocast does the mixed precision.
    dtype = torch.float32 if precision == FP32 else torch_dtype(precision)
    if train.method == "qlora":
        base = quantized_base(config, precision)
    else:
        base = load_base_model(config.model, dtype)
    model_config = base.config.to_dict()
    if train.method == "full":
        moe_layout(model_config)  # refuses experts llamatailor cannot merge or export
        return base.requires_grad_(True)
    return get_peft_model(base, lora_config(train.lora, chat.family, model_config))
