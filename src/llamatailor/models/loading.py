"""Load the tokenizer (with its chat format) and the model for a run, the same way in every stage."""

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import HFValidationError
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llamatailor.config import ModelSection
from llamatailor.errors import ModelLoadError
from llamatailor.models.base_check import refuse_missing_weights
from llamatailor.models.families import Family, detect_family
from llamatailor.models.model_config import corrected_config
from llamatailor.models.source import ModelSource, resolve_source
from llamatailor.textfiles import read_text
from llamatailor.vocabulary import BF16, FP16, FP32, Precision

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "chat_template", "added_tokens")
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

    @functools.cached_property
    def adds_bos(self) -> bool:
        """Whether encoding plain text starts with bos (the fast tokenizer's post-processor decides)."""
        tokenizer = self.tokenizer
        return tokenizer.bos_token_id is not None and tokenizer.encode("a")[:1] == [tokenizer.bos_token_id]


def load_tokenizer(model: ModelSection, source: ModelSource | None = None) -> ChatTokenizer:
    """The base model's tokenizer, with the run file's template override or a family default applied."""
    source = source or resolve_source(model.base)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, source, model.revision)
    return prepare_tokenizer(tokenizer, model)


def load_saved_tokenizer(folder: Path, model: ModelSection) -> ChatTokenizer:
    """The tokenizer saved with a run's adapter: exactly the one (and template) used in training. Loaded
    once per process while its files are unchanged (a 128k vocabulary takes over a second): callers share
    the object and must not change it."""
    files = (
        sorted(p for p in folder.iterdir() if p.name.startswith(TOKENIZER_FILES)) if folder.is_dir() else []
    )
    tokenizer = _saved_tokenizer(
        folder.resolve(), tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    )
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{folder}: the saved tokenizer has no chat template")
    return ChatTokenizer(tokenizer, detect_family(tokenizer, model.family), f"saved in {folder}")


@functools.lru_cache(maxsize=8)
def _saved_tokenizer(folder: Path, stamp: tuple[tuple[str, int, int], ...]) -> PreTrainedTokenizerBase:
    """`stamp` (name, mtime, size of each tokenizer file) makes a changed folder a new cache entry."""
    return AutoTokenizer.from_pretrained(folder)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: ModelSection) -> ChatTokenizer:
    if model.chat_template is not None:
        try:
            tokenizer.chat_template = read_text(model.chat_template)
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


def torch_dtype(precision: Precision) -> torch.dtype:
    """The torch dtype a precision name stands for."""
    return {FP32: torch.float32, BF16: torch.bfloat16, FP16: torch.float16}[precision]


def load_base_model(
    model: ModelSection,
    dtype: torch.dtype = torch.float32,
    source: ModelSource | None = None,
    quantization: BitsAndBytesConfig | None = None,
) -> PreTrainedModel:
    """The base model, on this process's GPU when there is one (left unplaced for FSDP/DeepSpeed to shard).

    A local base was checked by `resolve_source` before anything was allocated; a hub id is checked here,
    once downloaded, by transformers' load report. Raises ModelLoadError when weights are missing."""
    source = source or resolve_source(model.base)
    kwargs: dict[str, Any] = {"dtype": dtype, "output_loading_info": True}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    sharded = any(
        os.environ.get(name) == "true" for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    )
    if torch.cuda.is_available() and not sharded:
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    loaded, loading_info = _from_pretrained(
        AutoModelForCausalLM.from_pretrained, source, model.revision, **kwargs
    )
    refuse_missing_weights(f"model.base {source.spec!r}", loading_info)
    name_the_decoder(loaded)
    return loaded


def name_the_decoder(model: PreTrainedModel) -> None:
    """Make `model.base_model` the decoder stack, as code outside transformers expects of a causal LM (TRL's
    fused log-prob head in eval's perplexity and in DPO, our answer loss). Llama4ForCausalLM's
    `base_model_prefix` names the multimodal checkpoint's `language_model`, which the text model lacks, so its
    `base_model` is the whole model; its decoder is `model`. Changed on this instance only: loading is done,
    and no checkpoint conversion is registered for Llama 4 that would read the prefix when PEFT saves."""
    if model.base_model is model and isinstance(getattr(model, "model", None), torch.nn.Module):
        model.base_model_prefix = "model"


def load_tuned_model(
    model: ModelSection, folder: Path, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A run's result: the base with its adapter (PEFT's own loader), or a fully fine-tuned model."""
    if (folder / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(load_base_model(model, dtype), folder)
    if (folder / "config.json").is_file():
        return load_base_model(model.model_copy(update={"base": str(folder)}), dtype)
    raise ModelLoadError(f"{folder}: no trained adapter or model here; run `llamatailor train` first")


@contextlib.contextmanager
def base_model_of(tuned: PreTrainedModel, model: ModelSection) -> Iterator[PreTrainedModel]:
    """The untuned model to compare with: the same object with its adapter off, or the base loaded anew."""
    if isinstance(tuned, PeftModel):
        with tuned.disable_adapter():
            yield tuned
    else:
        yield load_base_model(model, next(tuned.parameters()).dtype).eval()


def _from_pretrained(loader: Any, source: ModelSource, revision: str | None, **kwargs: Any) -> Any:
    hub_kwargs = {"revision": revision} if source.kind == "hub" and revision else {}
    try:
        config = corrected_config(source.location, hub_kwargs)
        if config is not None:
            kwargs["config"] = config
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
