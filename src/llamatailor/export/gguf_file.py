"""Our own conversion of a merged Llama-architecture folder to GGUF, with the `gguf` package: Llama 1-3 (and
SmolLM2) under llama.cpp's `llama` architecture, text-only Llama 4 under `llama4` (export/gguf_llama4.py).

What llama.cpp needs beyond the weights, and what peers lose most often, is written from the tokenizer the
model was trained with: the vocabulary (byte-level BPE for Llama 3 and SmolLM2, SentencePiece-style for
Llama 2), its pre-tokenizer, the chat template, and the special tokens (bos, eos, end-of-turn, pad).
F32, F16 and BF16 are written here; every other type is quantized from that file by llama.cpp itself.
"""

import ctypes
import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from llamatailor.errors import CheckFailed
from llamatailor.export.gguf_llama4 import (
    LLAMA4_TEXT,
    check_llama4,
    kept_f32,
    llama4_arrays,
    write_moe_metadata,
)
from llamatailor.export.pre_tokenizer import pre_tokenizer_name
from llamatailor.export.rope import GgufRope, gguf_rope
from llamatailor.models.loading import ChatTokenizer
from llamatailor.rundir import atomic_path

WRITTEN_HERE = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
}
# transformers' model_type -> llama.cpp's architecture
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, LLAMA4_TEXT: gguf.MODEL_ARCH.LLAMA4}


def vocabulary(folder: Path, chat: ChatTokenizer, vocab_size: int) -> dict[str, Any]:
    """Tokens, types, scores, merges and the tokenizer kind for GGUF, from the saved tokenizer.json."""
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer_json["model"]
    if model["type"] != "BPE":
        raise CheckFailed(f"{folder}/tokenizer.json: model type {model['type']!r}; expected BPE")
    by_id = {index: token for token, index in chat.tokenizer.get_vocab().items()}
    added = {item["id"]: item for item in tokenizer_json.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    spm = bool(model.get("byte_fallback"))
    rank = {merge.replace(" ", ""): position for position, merge in enumerate(merges)} if spm else {}
    tokens, types, scores = [], [], []
    for index in range(vocab_size):
        token = by_id.get(index, f"[PAD{index}]")
        tokens.append(token)
        if index not in by_id:
            types.append(gguf.TokenType.USER_DEFINED)
        elif index in added and added[index].get("special"):
            types.append(gguf.TokenType.CONTROL)
        elif index in added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
        # SentencePiece merges by score; a merged piece's score is minus its merge rank, as in BPE.
        scores.append(-float(rank.get(token, 0)) if spm else 0.0)
    return {
        "model": "llama" if spm else "gpt2",
        "pre": None if spm else pre_tokenizer_name(chat.tokenizer, tokenizer_json),
        "tokens": tokens,
        "types": types,
        "scores": scores,
        "merges": [] if spm else merges,
        "add_space_prefix": spm and space_prefix_everywhere(tokenizer_json),
    }


def space_prefix_everywhere(tokenizer_json: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text after every special token, as
    llama.cpp's add_space_prefix does (legacy Llama 2: a Prepend normalizer; Metaspace "always"). With
    Metaspace "first" only the start of the whole text gets it, which llama.cpp matches on chat texts (they
    start with a special token) when add_space_prefix is off."""
    normalizer = json.dumps(tokenizer_json.get("normalizer") or {})
    pre = tokenizer_json.get("pre_tokenizer") or {}
    return '"Prepend"' in normalizer or pre.get("prepend_scheme") == "always"


def write_metadata(
    writer: gguf.GGUFWriter, config: PretrainedConfig, name: str, file_type: int, rope: GgufRope
) -> None:
    """The model's hyperparameters under `writer.arch`'s keys (llama or llama4), RoPE as `rope` says."""
    llama4 = config.model_type == LLAMA4_TEXT
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    # llama4's dense layers are intermediate_size_mlp wide; its intermediate_size is the experts'
    writer.add_feed_forward_length(config.intermediate_size_mlp if llama4 else config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    # RoPE base and scaling as llama.cpp reads them (export/rope.py proved they rotate as transformers does)
    for key, value in rope.keys(writer.arch).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, value)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    if llama4:
        write_moe_metadata(writer, config)


def write_tokenizer(writer: gguf.GGUFWriter, vocab: dict[str, Any], chat: ChatTokenizer) -> None:
    tokenizer = chat.tokenizer
    writer.add_tokenizer_model(vocab["model"])
    if vocab["pre"]:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_scores(vocab["scores"])
    if vocab["merges"]:
        writer.add_token_merges(vocab["merges"])
    if vocab["model"] == "llama":
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    for kind in ("bos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # eos is the end-of-turn token, so llama.cpp, Ollama and LM Studio stop where training taught it to.
    end_of_turn = chat.stop_ids[0]
    writer.add_eos_token_id(end_of_turn)
    writer.add_eot_token_id(end_of_turn)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)) or chat.adds_bos)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF stores q/k rows for rotary embedding as two halves per head; llama.cpp expects them interleaved."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def hf_arrays(key: str, array: np.ndarray, config: PretrainedConfig) -> Any:
    """(transformers name, array) in the layout llama.cpp wants: Llama 1-3's Q and K rows permuted for
    its rotary pairs; Llama 4's experts as `gguf_llama4.llama4_arrays` splits them."""
    if config.model_type == LLAMA4_TEXT:
        yield from llama4_arrays(key, array)
    elif key.endswith("q_proj.weight"):
        yield key, permute_rotary(array, config.num_attention_heads)
    elif key.endswith("k_proj.weight"):
        yield key, permute_rotary(array, config.num_key_value_heads)
    else:
        yield key, array


def tensors(folder: Path, config: PretrainedConfig, rope: GgufRope) -> Any:
    """(GGUF name, fp32 array) for every weight of the merged folder, and `rope_freqs` when RoPE has factors,
    named for the config's architecture (ARCHITECTURES)."""
    arch = ARCHITECTURES[config.model_type]
    if rope.factors is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope.factors
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if "rotary_emb" in key:
                    continue
                array = handle.get_tensor(key).to(torch.float32).numpy()
                for hf_name, part in hf_arrays(key, array, config):
                    yield gguf_name(names, hf_name, arch, shard), part


def gguf_name(names: gguf.TensorNameMap, hf_name: str, arch: gguf.MODEL_ARCH, where: Path) -> str:
    """llama.cpp's name ("blk.0.attn_q.weight") for the transformers tensor `hf_name`
    ("model.layers.0.self_attn.q_proj.weight"), from `names` (gguf.get_tensor_name_map of `arch`).
    Raises CheckFailed naming `where` (the file it came from) when the architecture has no such tensor."""
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise CheckFailed(
            f"{where}: tensor {hf_name} has no GGUF name for the {gguf.MODEL_ARCH_NAMES[arch]} architecture"
        )
    return str(name)


def export_config(folder: Path) -> tuple[PretrainedConfig, gguf.MODEL_ARCH]:
    """The merged model's config and llama.cpp's architecture for it, after refusing what llama.cpp would
    run differently. Raises CheckFailed for a model_type other than llama and llama4_text (naming it), and
    for a Llama 4 config llama.cpp hard-codes otherwise (gguf_llama4.check_llama4)."""
    try:
        config = AutoConfig.from_pretrained(folder)
    except ValueError as error:  # a model_type transformers does not know
        raise CheckFailed(
            f"{folder}: {error}; GGUF export handles {' and '.join(ARCHITECTURES)} only"
        ) from error
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        multimodal = (
            " (a Llama4ForConditionalGeneration: llama.cpp keeps its vision tower in a separate mmproj file; "
            "save its language model as a Llama4ForCausalLM, model_type llama4_text, to export the text part)"
            if config.model_type == "llama4"
            else ""
        )
        raise CheckFailed(
            f"{folder}: model_type {config.model_type!r}{multimodal}; GGUF export handles "
            f"{' and '.join(ARCHITECTURES)} only"
        )
    if arch == gguf.MODEL_ARCH.LLAMA4:
        check_llama4(config, str(folder))
    return config, arch


def check_export(folder: Path) -> GgufRope:
    """Refuse, before anything is written, a model folder GGUF export cannot write faithfully: its
    architecture (`export_config`) or its RoPE (export/rope.py). Returns what will be written for RoPE;
    raises CheckFailed naming the key, its value and what llama.cpp would do instead."""
    config, _ = export_config(folder)
    return gguf_rope(config, str(folder))


def write_gguf(
    folder: Path,
    target: Path,
    gguf_type: str,
    chat: ChatTokenizer,
    name: str,
    tokenizer_folder: Path | None = None,
) -> Path:
    """Write `folder` (a merged Llama 1-3 or text-only Llama 4 model) as a GGUF file of type f32, f16 or
    bf16, under llama.cpp's `llama` or `llama4` architecture. The vocabulary is read from
    `tokenizer_folder`'s tokenizer.json (default `folder`): the run's own, when `folder` is the untuned base
    that a LoRA GGUF is applied to.

    Raises CheckFailed before anything is written when `check_export` refuses the model (another model_type,
    a Llama 4 config llama.cpp hard-codes otherwise, a RoPE type llama.cpp cannot reproduce)."""
    config, arch = export_config(folder)
    rope = gguf_rope(config, str(folder))
    file_type, tensor_type = WRITTEN_HERE[gguf_type]
    vocab = vocabulary(tokenizer_folder or folder, chat, config.vocab_size)
    with atomic_path(target) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        write_metadata(writer, config, name, file_type, rope)
        write_tokenizer(writer, vocab, chat)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, array in tensors(folder, config, rope):
            if array.ndim == 1 or tensor_type == gguf.GGMLQuantizationType.F32 or kept_f32(tensor_name):
                writer.add_tensor(tensor_name, array)
            else:
                writer.add_tensor(
                    tensor_name, gguf.quants.quantize(array, tensor_type), raw_dtype=tensor_type
                )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return target


def quantize_gguf(source: Path, target: Path, gguf_type: str, threads: int) -> Path:
    """Any llama.cpp type (q8_0, q4_k_m, ...) from an f32/f16/bf16 GGUF, through llama.cpp's quantizer."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = threads
    from llama_cpp._utils import suppress_stdout_stderr

    with atomic_path(target) as tmp, suppress_stdout_stderr(disable=False):  # llama.cpp logs per tensor
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0 or not tmp.is_file():
            raise CheckFailed(f"llama.cpp could not quantize {source} to {gguf_type} (code {code})")
    return target
