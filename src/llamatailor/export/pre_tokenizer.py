"""llama.cpp's name for the way a byte-level BPE tokenizer splits text before merging (`tokenizer.ggml.pre`).

llama.cpp does not read a tokenizer.json: it splits text with its own code for each name it knows, so the name a
GGUF declares decides its token ids. Its converter (`get_vocab_base_pre` in convert_hf_to_gguf.py; in the pinned
llama-cpp-python 0.3.36 sdist: vendor/llama.cpp/conversion/base.py) identifies a tokenizer by encoding a fixed
text and hashing the ids. We do the same with the entries that concern the Llama family, then compare the result
with the tokenizer's own structure, because the hash cannot see everything the name decides: SmolLM2's
vocabulary hashes the same under GPT-2's and SmolLM's splitting (its merges never join a space and a digit),
and `ignore_merges`, which llama-bpe turns on, changes no id of the check text.
"""

import hashlib
import json
import logging
from typing import Any

from transformers import PreTrainedTokenizerBase

from llamatailor.errors import CheckFailed

log = logging.getLogger(__name__)

# llama.cpp's check text, character for character: any change makes every hash below meaningless.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫\ufe0f (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of str(ids of CHECK_TEXT, special tokens added) -> name, from the pinned llama.cpp's table.
KNOWN_HASHES = {
    # meta-llama/Meta-Llama-3-8B (and 3.1-3.3, which share its tokenizer; begin_of_text added)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    # abacusai/Smaug-Llama-3-70B-Instruct; also Llama 3's own vocabulary when no bos is added
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    # meta-llama/Llama-4-Scout-17B-16E-Instruct
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    # HuggingFaceTB/SmolLM-135M; SmolLM2 shares the tokenizer
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    # openai-community/gpt2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# Meta's Llama 3 split pattern as its tokenizer.json spells it (llama.cpp's llama-bpe and smaug-bpe use it).
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
# Meta's Llama 4 split pattern as its tokenizer.json spells it: llama.cpp's `llama4` names it (pre-type GPT4O,
# merges applied to every piece, no space clean-up). llama-vocab.cpp runs an ASCII approximation of it in which
# every non-ASCII letter is both upper and lower case, so a lower-case word running into a non-ASCII capital
# ("данныеМир") stays one piece there and its ids can differ (tests/test_export_llama4.py pins one such case).
LLAMA4_SPLIT = (
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+"
    "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def check_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 (hex) of `str(ids)` for CHECK_TEXT encoded with special tokens, as llama.cpp's converter hashes it
    (`tokenizer.encode(chktxt)`, so a tokenizer that adds a bos hashes differently from one that does not)."""
    ids = tokenizer.encode(CHECK_TEXT)
    return hashlib.sha256(str(ids).encode()).hexdigest()


def structural_name(tokenizer_json: dict[str, Any]) -> str | None:
    """The name whose splitting this tokenizer.json's pre-tokenizer reproduces exactly, or None when it is none
    of the shapes below (each is the tokenizer.json of the model llama.cpp's table names, and llama.cpp's split
    for that name: llama-vocab.cpp's regexes, and `ignore_merges` for llama-bpe only; llama4 merges every
    piece, so a Llama 4 split that takes whole words first is none of them)."""
    if tokenizer_json.get("normalizer"):
        return None  # llama.cpp normalizes nothing before a byte-level BPE split
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if not kinds or kinds[-1] != "ByteLevel" or parts[-1].get("add_prefix_space"):
        return None
    byte_regex = parts[-1].get("use_regex", True)
    if kinds == ["ByteLevel"] and byte_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and byte_regex:
        return "smollm"
    split = parts[0]
    if (
        kinds != ["Split", "ByteLevel"]
        or byte_regex
        or split.get("behavior") != "Isolated"
        or split.get("invert")
    ):
        return None
    pattern, whole_words = (
        split.get("pattern", {}).get("Regex"),
        tokenizer_json.get("model", {}).get("ignore_merges"),
    )
    if pattern == LLAMA3_SPLIT:
        # the two names split alike; llama-bpe also takes a whole word from the vocabulary before merging
        return "llama-bpe" if whole_words else "smaug-bpe"
    if pattern == LLAMA4_SPLIT and not whole_words:
        return "llama4"
    return None


def pre_tokenizer_name(tokenizer: PreTrainedTokenizerBase, tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer, identified as llama.cpp's converter does
    (convert_hf_to_gguf.py, get_vocab_base_pre: the hash of the check text's ids) and checked against the
    tokenizer's structure (`structural_name`).

    - hash known, structure unrecognised or agreeing: the hash's name;
    - hash known, structure recognised as another name: the structure's name, with a warning, because the GGUF
      must split as the tokenizer the model was trained with does (the hash cannot see `ignore_merges`, and
      cannot tell GPT-2's split from SmolLM's on SmolLM's vocabulary);
    - hash unknown: the structure's name when it is recognised.

    Raises CheckFailed when neither identifies it, naming the hash, the pre-tokenizer and the known names.
    """
    digest = check_hash(tokenizer)
    by_hash = KNOWN_HASHES.get(digest)
    by_structure = structural_name(tokenizer_json)
    if by_hash and by_structure and by_hash != by_structure:
        log.warning(
            "The tokenizer's check-text hash is llama.cpp's %r, but its pre-tokenizer splits like %r; writing %r "
            "so that llama.cpp's ids equal the tokenizer's. A tokenizer loaded from a GGUF by transformers can "
            "lose its pre-tokenizer: the base model itself may split like %r.",
            by_hash,
            by_structure,
            by_structure,
            by_hash,
        )
    name = by_structure or by_hash
    if name is None:
        pre = json.dumps(tokenizer_json.get("pre_tokenizer"))[:300]
        raise CheckFailed(
            f"llama.cpp's pre-tokenizer for this tokenizer is unknown: the hash of its check-text ids, {digest}, "
            f"is none of {sorted(set(KNOWN_HASHES.values()))}, and its pre-tokenizer {pre} (normalizer "
            f"{json.dumps(tokenizer_json.get('normalizer'))[:100]}) is none of the shapes recognised here "
            "(GPT-2 byte-level; SmolLM digits + byte-level; Llama 3 or Llama 4 split + byte-level); a GGUF would "
            "tokenize "
            "differently from the model's tokenizer"
        )
    return name
