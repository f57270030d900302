"""The reference tokenizers are the models' own, and an exported GGUF tokenizes as the training tokenizer does.

The references (tests/tiny_models.py) are built from GGUF files; they must give the ids of llama.cpp's test
vectors shipped beside those files. The exported GGUF's `tokenizer.ggml.pre` is identified as llama.cpp's
converter does, and llama.cpp's ids must equal the tokenizer's on texts that tell the pre-tokenizers apart.
"""

import ast
import json
import logging
import re
import tarfile
from pathlib import Path

import gguf
import llama_cpp
import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from llamatailor.config import ModelSection
from llamatailor.errors import CheckFailed
from llamatailor.export.gguf_file import write_gguf
from llamatailor.export.pre_tokenizer import CHECK_TEXT, KNOWN_HASHES, check_hash, pre_tokenizer_name
from llamatailor.models.loading import load_saved_tokenizer
from llamatailor.models.source import embedded_gguf_path
from tiny_models import (
    LLAMA_CPP_PYTHON_VERSION,
    build_tiny_model,
    llama_cpp_model_file,
    llama_cpp_sdist,
    real_tokenizer,
)

VOCAB_FILES = {"llama3": "ggml-vocab-llama-bpe.gguf", "llama2": "ggml-vocab-llama-spm.gguf"}
# Texts on which llama.cpp's pre-tokenizers (gpt-2, smollm, llama-bpe, smaug-bpe) and space prefixes differ.
TEXTS = [
    "x  1",
    "a   b\n\n  c",
    "12345 6789",
    "3.14159 and 1,000,000",
    "I'm, you'll, they'D",
    "Привет мир",
    "日本語のテキスト",
    "مرحبا",
    "Cửa Việt",
    "🦙🚀 emoji 😶\u200d🌫\ufe0f",
    "  leading",
    "trailing  ",
    "\t tab\t\t",
]
EXPECTED_PRE = {"chatml": "smollm", "llama3": "llama-bpe", "llama2": None}


def llama_cpp_vectors(vocab_file: str) -> list[tuple[str, list[int]]]:
    """(text, ids without bos) pairs, read as llama.cpp's tests/test-tokenizer-0.cpp reads them: inputs
    separated by a marker line, one line of space-separated ids per input, tokenized with add_special=false."""
    raw = llama_cpp_model_file(f"{vocab_file}.inp").read_text(encoding="utf-8")
    lines = llama_cpp_model_file(f"{vocab_file}.out").read_text(encoding="utf-8").splitlines()
    separator = "\n__ggml_vocab_test__\n"
    texts = raw.split(separator)
    if raw.endswith(separator):  # the C++ reader stops at the end: no empty input after the last marker
        texts.pop()
    assert len(texts) == len(lines)
    return [(text, [int(token) for token in line.split()]) for text, line in zip(texts, lines, strict=True)]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fidelity")
    return {kind: build_tiny_model(kind, root / kind / "model") for kind in ("chatml", "llama3", "llama2")}


def llama_cpp_ids(path: Path, texts: list[str]) -> list[list[int]]:
    model = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return [model.tokenize(text.encode(), add_bos=False, special=True) for text in texts]
    finally:
        model.close()


@pytest.mark.parametrize("kind", ["llama3", "llama2"])
def test_reference_tokenizers_pass_llama_cpp_vectors(kind, tiny_folders):
    vectors = llama_cpp_vectors(VOCAB_FILES[kind])
    assert len(vectors) == 46
    texts = [text for text, _ in vectors]
    expected = [ids for _, ids in vectors]
    # the vectors are llama.cpp's own answers with this vocabulary
    assert llama_cpp_ids(llama_cpp_model_file(VOCAB_FILES[kind]), texts) == expected
    # the tokenizer saved with the tiny model (the one tests compare against), after a save and reload
    saved = AutoTokenizer.from_pretrained(tiny_folders[kind])
    passed = [saved.encode(text, add_special_tokens=False) == ids for text, ids in vectors]
    assert sum(passed) == 46, [text for text, ok in zip(texts, passed, strict=True) if not ok]
    if kind == "llama2":  # conftest uses this one unsaved
        direct = real_tokenizer("llama2")
        assert [direct.encode(text, add_special_tokens=False) for text in texts] == expected
    else:  # Meta's tokenizer ignores merges for words in the vocabulary, and adds begin_of_text
        assert saved.encode("Cửa Việt", add_special_tokens=False) == [34, 91163, 101798]
        assert saved.encode("Hi") == [128000, 13347]


def test_check_text_and_hashes_are_the_pinned_llama_cpp_converters():
    member = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/conversion/base.py"
    with tarfile.open(llama_cpp_sdist()) as archive:
        file = archive.extractfile(member)
        assert file is not None
        source = file.read().decode("utf-8")
    text = re.search(r"^\s*chktxt = (.+)$", source, re.MULTILINE)
    assert text is not None and ast.literal_eval(text.group(1)) == CHECK_TEXT
    table = dict(re.findall(r'chkhsh == "([0-9a-f]{64})":\s*\n\s*#[^\n]*\n\s*res = "([^"]+)"', source))
    assert len(table) > 50  # the whole table was read
    assert {digest: table.get(digest) for digest in KNOWN_HASHES} == KNOWN_HASHES


def test_pre_tokenizer_named_by_hash_and_checked_against_structure(tiny_folders, caplog):
    chatml = AutoTokenizer.from_pretrained(tiny_folders["chatml"])
    llama3 = AutoTokenizer.from_pretrained(tiny_folders["llama3"])
    assert KNOWN_HASHES[check_hash(chatml)] == "smollm"
    assert KNOWN_HASHES[check_hash(llama3)] == "llama-bpe"
    # Llama 3's vocabulary without begin_of_text hashes as llama.cpp's smaug-bpe (same split, merges not ignored)
    llama3.add_bos_token = False
    assert KNOWN_HASHES[check_hash(llama3)] == "smaug-bpe"
    assert pre_tokenizer_name(llama3, backend_json(llama3)) == "llama-bpe"  # the structure sees ignore_merges
    # transformers' SmolLM2 tokenizer straight from the GGUF splits like GPT-2 but hashes as smollm: the GGUF
    # must split as the tokenizer does, and the mismatch is reported
    embedded = embedded_gguf_path("smollm2-135m-instruct")
    plain = AutoTokenizer.from_pretrained(embedded.parent, gguf_file=embedded.name)
    assert KNOWN_HASHES[check_hash(plain)] == "smollm"
    with caplog.at_level(logging.WARNING, logger="llamatailor.export.pre_tokenizer"):
        assert pre_tokenizer_name(plain, backend_json(plain)) == "gpt-2"
    assert "'smollm'" in caplog.text and "'gpt-2'" in caplog.text
    # neither the hash nor the structure known: refused, naming the hash and the known names
    chatml.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    with pytest.raises(CheckFailed, match=r"hash of its check-text ids, [0-9a-f]{64}, is none of .*'smollm'"):
        pre_tokenizer_name(chatml, backend_json(chatml))


def backend_json(tokenizer: object) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


@pytest.mark.parametrize("kind", ["chatml", "llama3", "llama2"])
def test_exported_gguf_tokenizes_like_the_training_tokenizer(kind, tiny_folders):
    folder = tiny_folders[kind]
    chat = load_saved_tokenizer(folder, ModelSection())
    path = write_gguf(folder, folder.parent / "m.gguf", "f32", chat, kind)
    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    assert (field.contents() if field else None) == EXPECTED_PRE[kind]
    hf = [chat.tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    assert llama_cpp_ids(path, TEXTS) == hf
    if kind == "chatml":  # the base model's ids: a run of spaces apart from the digit that follows
        assert hf[0] == [104, 256, 33]


def test_embedded_smollm2_gguf_tokenizes_like_its_reference_tokenizer():
    path = embedded_gguf_path("smollm2-135m-instruct")
    tokenizer = real_tokenizer("chatml")
    hf = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    assert llama_cpp_ids(path, TEXTS) == hf
    assert hf[0] == [104, 256, 33]  # "x", "  ", "1"; GPT-2's split gives [104, 216, 216, 33]
