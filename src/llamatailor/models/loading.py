"""Load the tokenizer (with its chat format) and the model for a run, the same way in every stage."""

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub.errors import HFValidationError
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llamatailor.config import ModelSection
from llamatailor.errors import ModelLoadError
from llamatailor.models.families import Family, detect_family
from llamatailor.models.source import ModelSource, resolve_source

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|finetune_right_pad|>", "<pad>", "[PAD]")


@dataclass(frozen=True)
class ChatTokenizer:
    """A tokenizer together with the chat format it is used with."""

    tokenizer: PreTrainedTokenizerBase
    family: Family
    template_origin: str

    @functools.cached_property
    def stop_ids(self) -> list[int]:
        return self.family.stop_token_ids(self.tokenizer)


def load_tokenizer(model: ModelSection, source: ModelSource | None = None) -> ChatTokenizer:
    """The base model's tokenizer, with the run file's template override or a family default applied."""
    source = source or resolve_source(model.base)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, source, model.revision)
    return prepare_tokenizer(tokenizer, model)


def load_saved_tokenizer(folder: Path, model: ModelSection) -> ChatTokenizer:
    """The tokenizer saved with a run's adapter: exactly the one (and template) used in training."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{folder}: the saved tokenizer has no chat template")
    return ChatTokenizer(tokenizer, detect_family(tokenizer, model.family), f"saved in {folder}")


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: ModelSection) -> ChatTokenizer:
    if model.chat_template is not None:
        try:
            tokenizer.chat_template = model.chat_template.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelLoadError(f"model.chat_template: cannot read {model.chat_template}: {exc}") from None
        origin = f"file {model.chat_template}"
    else:
        origin = "tokenizer"
    family = detect_family(tokenizer, model.family)
    if not tokenizer.chat_template:
        tokenizer.chat_template = family.default_template
        origin = f"llamatailor's {family.name} template (the tokenizer has none)"
        log.warning("The tokenizer has no chat template; using the %s format.", family.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = _pad_token(tokenizer)
    return ChatTokenizer(tokenizer, family, origin)


def _pad_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """A reserved pad token where the vocabulary has one, else eos (labels mask padding anyway)."""
    vocab = tokenizer.get_vocab()
    return next((token for token in PAD_CANDIDATES if token in vocab), tokenizer.eos_token)


def resolve_precision(requested: str) -> Precision:
    """bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU (bf16 matmul on CPU is ~250x slower)."""
    if requested != "auto":
        if requested != "fp32" and not torch.cuda.is_available():
            log.warning("precision %s on CPU is very slow; fp32 is recommended there", requested)
        return requested  # type: ignore[return-value]
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def torch_dtype(precision: Precision) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_base_model(
    model: ModelSection, dtype: torch.dtype = torch.float32, source: ModelSource | None = None
) -> PreTrainedModel:
    source = source or resolve_source(model.base)
    loaded = _from_pretrained(AutoModelForCausalLM.from_pretrained, source, model.revision, dtype=dtype)
    if torch.cuda.is_available():
        loaded = loaded.to("cuda")
    return loaded


def load_adapter_model(model: ModelSection, adapter: Path, dtype: torch.dtype = torch.float32) -> PeftModel:
    """The base model with a run's trained adapter on top (PEFT's own loader)."""
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter}: no trained adapter here; run `llamatailor train` first")
    return PeftModel.from_pretrained(load_base_model(model, dtype), adapter)


def _from_pretrained(loader: Any, source: ModelSource, revision: str | None, **kwargs: Any) -> Any:
    hub_kwargs = {"revision": revision} if source.kind == "hub" and revision else {}
    try:
        return loader(source.location, **hub_kwargs, **kwargs)
    except (OSError, HFValidationError) as exc:
        if source.kind == "hub":
            raise ModelLoadError(
                f"model.base: could not load {source.spec!r} from the Hugging Face Hub ({exc}). "
                "Without a network, point model.base at a local folder (config.json, *.safetensors, tokenizer "
                "files), a .gguf file, or the embedded alias smollm2-135m-instruct. Gated models (Llama) also "
                "need their licence accepted on the hub and HF_TOKEN set."
            ) from None
        raise ModelLoadError(f"model.base: cannot load {source.spec!r}: {exc}") from None
