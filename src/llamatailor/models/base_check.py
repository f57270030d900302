"""Is a base a model? Its weights checked against what its own config declares, before anything is allocated.

A GGUF holding only metadata (or only a vocabulary, like llama.cpp's `ggml-vocab-*.gguf` files) and a folder
holding only config.json would otherwise become randomly initialized models: transformers fills missing
weights with random ones and only logs it. The checks read tensor tables and headers, never tensor data:
- a GGUF file: its tensor table (names, shapes, types) through transformers' own GGUF reader, against the
  tensors llama.cpp's llama loader (llama-model.cpp, LLM_ARCH_LLAMA) requires for the metadata's shape;
- a Hugging Face folder: the safetensors headers (or the .bin pickles, mapped to the meta device) of every
  shard the index names, against the state dict of the model transformers would build from config.json
  (built on the meta device: no memory);
- after a load (hub ids are only known once downloaded): transformers' own report of missing weights.
Shapes are written in PyTorch order (rows first); ggml lists dimensions the other way round.
"""

import json
import pickle
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import gguf
import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import extract_weight_conversions_for_model
from transformers.integrations.gguf import reader as gguf_reader
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from llamatailor.errors import EncodingError, ModelLoadError
from llamatailor.models.model_config import corrected_config
from llamatailor.textfiles import read_text

Shape = tuple[int, ...]
SHOWN = 5  # names listed in a message; the rest are counted
GGUF_DEFAULT_ALIGNMENT = 32  # the GGUF specification's, when `general.alignment` is absent
# Per block: llama.cpp's names (the gguf package's table) and the shape each needs, given the model's sizes.
LLAMA_BLOCK = {
    gguf.MODEL_TENSOR.ATTN_NORM: lambda s: (s["hidden"],),
    gguf.MODEL_TENSOR.ATTN_Q: lambda s: (s["heads"] * s["head_dim"], s["hidden"]),
    gguf.MODEL_TENSOR.ATTN_K: lambda s: (s["kv_heads"] * s["head_dim"], s["hidden"]),
    gguf.MODEL_TENSOR.ATTN_V: lambda s: (s["kv_heads"] * s["value_dim"], s["hidden"]),
    gguf.MODEL_TENSOR.ATTN_OUT: lambda s: (s["hidden"], s["heads"] * s["value_dim"]),
    gguf.MODEL_TENSOR.FFN_NORM: lambda s: (s["hidden"],),
    gguf.MODEL_TENSOR.FFN_GATE: lambda s: (s["ffn"], s["hidden"]),
    gguf.MODEL_TENSOR.FFN_UP: lambda s: (s["ffn"], s["hidden"]),
    gguf.MODEL_TENSOR.FFN_DOWN: lambda s: (s["hidden"], s["ffn"]),
}


@dataclass(frozen=True)
class Expected:
    """The tensors a model's config calls for: name -> shape; `optional` ones may be absent (an output
    matrix tied to the embedding); `summary` says which model that is, for messages."""

    shapes: dict[str, Shape]
    optional: frozenset[str]
    summary: str


def check_gguf(path: Path) -> None:
    """Refuse a GGUF file that is not a whole model, before it is converted or its tokenizer parsed.

    Reads the metadata and tensor table only (~0.1 s, also for Llama 3's 128k vocabulary; gguf.GGUFReader
    parses every merge and takes 20 s there). Raises ModelLoadError naming the file when it is unreadable,
    holds no tensors, is cut short before its tensors' data ends, or (llama architecture) lacks a tensor
    llama.cpp's loader requires or holds one of another shape than the metadata implies.
    """
    metadata, table, data_start = _gguf_table(path)
    architecture = metadata.get("general.architecture")
    if architecture == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]:
        expected = _llama_gguf_expected(path, metadata)
    else:  # other architectures: transformers' load report (refuse_missing_weights) checks the rest
        expected = Expected({}, frozenset(), f"a {architecture} model, as its metadata declares")
    _compare(str(path), {name: shape for name, (shape, _, _) in table.items()}, expected)
    _check_gguf_length(path, table, data_start)


def _gguf_table(path: Path) -> tuple[dict[str, Any], dict[str, tuple[Shape, int, int]], int]:
    """`(metadata, {name: (shape, ggml type, offset)}, where the data section starts)`.

    transformers' reader, whose public `GgufHeader` also computes byte counts and so refuses types its own
    dequantizer lacks (Q5_0, Q5_1) that the llama loader still reads: its table walk is used instead.
    Raises ModelLoadError naming the file when it is empty, ends inside its header (a download cut short:
    the walk runs past the end), or is not GGUF."""
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(
            f"{path}: the file is empty (0 bytes), not a GGUF model (an interrupted download?)"
        )
    try:
        blob = gguf_reader._mapped(str(path))
        metadata, count, position = gguf_reader._read_metadata(blob, str(path))
        entries, position = gguf_reader._read_tensor_table(blob, count, position)
    except (struct.error, UnicodeDecodeError) as exc:
        if not _ran_past_end(exc):
            raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from None
        raise ModelLoadError(
            f"{path}: cut short: the file ends at byte {size:,}, inside its header (metadata and tensor "
            "table), so it is not a whole GGUF file (an interrupted download or copy?)"
        ) from None
    except (ValueError, IndexError) as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from None
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    data_start = (position + alignment - 1) // alignment * alignment
    return metadata, {name: (shape, kind, offset) for name, shape, kind, offset in entries}, data_start


def _ran_past_end(exc: Exception) -> bool:
    """Whether the header walk failed for want of bytes: a fixed-size field read past the end of the file
    (struct's "unpack_from requires a buffer of at least N bytes"), or a string whose last character the end
    of the file cuts ("unexpected end of data"). struct.error is no ValueError: both are caught here."""
    if isinstance(exc, struct.error):
        return "requires a buffer" in str(exc)
    return isinstance(exc, UnicodeDecodeError) and exc.reason == "unexpected end of data"


def _check_gguf_length(path: Path, table: dict[str, tuple[Shape, int, int]], data_start: int) -> None:
    """Every tensor's bytes lie inside the file (a cut-off download keeps its whole tensor table)."""
    size = path.stat().st_size
    for name, (shape, kind, offset) in table.items():
        try:
            block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except ValueError:
            raise ModelLoadError(
                f"{path}: tensor {name} has ggml type {kind}, which no GGUF reader here knows"
            ) from None
        end = data_start + offset + prod(shape) // block * block_bytes
        if end > size:
            raise ModelLoadError(
                f"{path}: cut short: tensor {name}'s data runs to byte {end:,} but the file ends at byte "
                f"{size:,} (an interrupted download or copy?)"
            )


def _llama_gguf_expected(path: Path, metadata: dict[str, Any]) -> Expected:
    """The tensors llama.cpp's llama loader requires for the sizes the metadata states; `output.weight` is
    optional (absent, the token embedding is reused: llama.cpp's TENSOR_DUPLICATED)."""
    arch = metadata["general.architecture"]

    def key(name: str, default: int | None = None) -> int:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{path}: the metadata has no {arch}.{name}; a {arch} model states it")
        return int(value)

    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads)
    # transformers' metadata walk leaves a string array as its length: the vocabulary's size
    sizes = {
        "hidden": hidden,
        "heads": heads,
        "kv_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "value_dim": key("attention.value_length", head_dim),
        "ffn": key("feed_forward_length"),
        "vocab": key("vocab_size", metadata.get("tokenizer.ggml.tokens")),
    }
    layers = key("block_count")
    names = gguf.TENSOR_NAMES
    shapes = {
        names[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight": (sizes["vocab"], hidden),
        names[gguf.MODEL_TENSOR.OUTPUT_NORM] + ".weight": (hidden,),
        names[gguf.MODEL_TENSOR.OUTPUT] + ".weight": (sizes["vocab"], hidden),
    }
    for block in range(layers):
        for tensor, shape in LLAMA_BLOCK.items():
            shapes[names[tensor].format(bid=block) + ".weight"] = shape(sizes)
    summary = (
        f"a {arch} model with {layers} layers, hidden size {hidden} and a {sizes['vocab']:,}-token vocabulary, "
        "as its metadata declares"
    )
    return Expected(shapes, frozenset({names[gguf.MODEL_TENSOR.OUTPUT] + ".weight"}), summary)


def check_hf_folder(folder: Path) -> None:
    """Refuse a Hugging Face model folder whose weights are not those its config.json declares.

    Every weight file must be there (a single file, or each shard its index names) and readable; their
    headers must hold each tensor of the model transformers builds from config.json, in that shape. The
    names are compared only when the checkpoint was saved from that very class and transformers renames
    none of its keys (not so for Llama 4's multimodal checkpoints, nor pre-quantized ones): otherwise the
    files must hold some tensors, and `refuse_missing_weights` checks the load. Raises ModelLoadError.
    """
    config = _hf_config(folder)
    found: dict[str, Shape] = {}
    for file in _weight_files(folder):
        found |= _header_shapes(file)
    _compare(str(folder), found, _hf_expected(folder, config))


def _hf_config(folder: Path) -> Any:
    try:
        return corrected_config(str(folder)) or AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}/config.json: not a config transformers can read ({exc})") from None


def _hf_expected(folder: Path, config: Any) -> Expected:
    try:
        with torch.device("meta"):  # shapes and names only: no memory, ~0.03 s for an 8B Llama
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise ModelLoadError(f"{folder}/config.json: not a causal language model ({exc})") from None
    layers, hidden = getattr(config, "num_hidden_layers", "?"), getattr(config, "hidden_size", "?")
    summary = (
        f"a {type(model).__name__} with {layers} layers and hidden size {hidden}, as its config.json declares"
    )
    same_class = type(model).__name__ in (getattr(config, "architectures", None) or [])
    plain = getattr(config, "quantization_config", None) is None
    if not (same_class and plain and extract_weight_conversions_for_model(model) is None):
        return Expected({}, frozenset(), summary)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    return Expected(shapes, frozenset(model.all_tied_weights_keys), summary)


def _weight_files(folder: Path) -> list[Path]:
    """The weight files transformers would read, in its order: safetensors before .bin, a single file before
    an index. Raises ModelLoadError when there are none, or when shards the index names are missing."""
    for single, index in ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            shards = _index_shards(folder / index)
            missing = [name for name in shards if not (folder / name).is_file()]
            if missing:
                raise ModelLoadError(
                    f"{folder / index}: {len(missing)} of its {len(shards)} shards are missing: "
                    f"{_listed(missing)}; expected every file the index's weight_map names"
                )
            return [folder / name for name in shards]
    raise ModelLoadError(
        f"{folder}: no weights: config.json but no {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, {WEIGHTS_NAME} "
        f"or {WEIGHTS_INDEX_NAME}; a base model folder holds its weights beside its config"
    )


def _index_shards(index: Path) -> list[str]:
    """The shard file names of a `*.index.json`, in first-mention order."""
    try:
        weight_map = json.loads(read_text(index))["weight_map"]
        return list(dict.fromkeys(weight_map.values()))
    except (OSError, EncodingError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(
            f"{index}: not a weight index (a JSON object with a weight_map): {exc}"
        ) from None


def _header_shapes(file: Path) -> dict[str, Shape]:
    """Tensor name -> shape, from the safetensors header, or the .bin pickle mapped onto the meta device."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as handle:
                return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
        state = torch.load(file, map_location="meta", mmap=True, weights_only=True)
        return {name: tuple(tensor.shape) for name, tensor in state.items()}
    except (OSError, SafetensorError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        raise ModelLoadError(f"{file}: cannot read its tensors' names and shapes ({exc})") from None


def _compare(where: str, found: dict[str, Shape], expected: Expected) -> None:
    """Raise ModelLoadError naming `where` when `found` has no tensors at all, lacks a required one of
    `expected`, or holds one in another shape; tensors beyond `expected` are left to the loader."""
    count = len(expected.shapes) - len(expected.optional)
    wanted = f"the {count} tensors of {expected.summary}" if count else f"the weights of {expected.summary}"
    if not found:
        example = next(iter(expected.shapes.items()), None)
        raise ModelLoadError(
            f"{where}: no weights: it holds no tensors at all (metadata or a vocabulary only); a base model "
            f"needs {wanted}" + (f", e.g. {example[0]} {example[1]}" if example else "")
        )
    missing = [name for name in expected.shapes if name not in found and name not in expected.optional]
    wrong = [
        f"{name} is {found[name]} where {shape} was expected"
        for name, shape in expected.shapes.items()
        if name in found and found[name] != shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of its {count} weights are missing ({_listed(missing)})")
    if wrong:
        problems.append(f"{_counted(len(wrong), 'weight')} of the wrong shape ({_listed(wrong)})")
    if problems:
        raise ModelLoadError(f"{where}: not a whole model: {' and '.join(problems)}; expected {wanted}")


def refuse_missing_weights(where: str, loading_info: dict[str, Any]) -> None:
    """After a load: raise ModelLoadError when transformers reports weights it initialized at random (the
    file lacked them); `loading_info` is what `from_pretrained(..., output_loading_info=True)` returns."""
    missing = sorted(loading_info.get("missing_keys") or ())
    if missing:
        raise ModelLoadError(
            f"{where}: not a whole model: {_counted(len(missing), 'weight')} the model needs "
            f"{'is' if len(missing) == 1 else 'are'} not in its files ({_listed(missing)}); transformers would "
            f"initialize {'it' if len(missing) == 1 else 'them'} at random"
        )


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
