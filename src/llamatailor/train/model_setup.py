"""The model a training run updates: an adapter (LoRA, DoRA, rsLoRA) on a full-precision base, the same on
a 4- or 8-bit base (QLoRA), or every weight (full fine-tuning)."""

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, PreTrainedModel

from llamatailor.config import LoraSection, QuantizationSection, RunConfig
from llamatailor.hardware import use_gradient_checkpointing
from llamatailor.models.families import Family
from llamatailor.models.loading import ChatTokenizer, load_base_model, torch_dtype
from llamatailor.vocabulary import AUTO, FP32, Precision


def lora_config(lora: LoraSection, family: Family) -> LoraConfig:
    """PEFT's LoraConfig for the run's lora section; all-linear means the family's linear layers.
    Raises ConfigError for an unknown target preset."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.linears(family.lora_targets)),
        use_dora=lora.dora,
        use_rslora=lora.rslora,
        task_type="CAUSAL_LM",
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
    fp32 they would take 8 GB more on a Llama 3 70B. Norms stay fp32 (tiny, and better for stability)."""
    dtype = torch_dtype(precision)
    base = load_base_model(
        config.model, dtype, quantization=quantization_config(config.train.quantization, precision)
    )
    base = prepare_model_for_kbit_training(
        base, use_gradient_checkpointing=use_gradient_checkpointing(config.train.gradient_checkpointing)
    )
    for module in (base.get_input_embeddings(), base.get_output_embeddings()):
        module.to(dtype)
    return base


def trainable_model(
    config: RunConfig, chat: ChatTokenizer, precision: Precision
) -> PeftModel | PreTrainedModel:
    """The model with exactly the weights the method trains set to require gradients."""
    train = config.train
    # On GPUs the frozen base is kept in the compute dtype; autocast does the mixed precision.
    dtype = torch.float32 if precision == FP32 else torch_dtype(precision)
    if train.method == "full":
        return load_base_model(config.model, dtype).requires_grad_(True)
    if train.method == "qlora":
        base = quantized_base(config, precision)
    else:
        base = load_base_model(config.model, dtype)
    return get_peft_model(base, lora_config(train.lora, chat.family))
