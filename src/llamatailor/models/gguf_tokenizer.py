"""The tokenizer a GGUF file describes, tokenizing as llama.cpp does with the same file: for the embedded
model's conversion and for the tests' reference tokenizers."""

from pathlib import Path

from tokenizers import normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.integrations.gguf.reader import read_gguf_metadata

# llama.cpp's names that split like Llama 3 and ignore merges for whole words (llama-vocab.cpp, LLAMA3 pre type)
LLAMA3_PRE_NAMES = ("llama3", "llama-v3", "llama-bpe")


def tokenizer_from_gguf(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer a GGUF file describes, tokenizing as llama.cpp does with that file.

    transformers 5.23 (integrations/gguf/gguf_tokenizer_mapping.py) builds it from the vocabulary and merges but
    does not apply these, which llama.cpp (llama-vocab.cpp, `llama_vocab::impl::load`) reads from the file:
    - `tokenizer.ggml.pre` "smollm": digits split one by one before GPT-2's split (SmolLM's tokenizer.json);
    - the Llama 3 names: `ignore_merges` (a word already in the vocabulary is one token) and, unless the file
      says otherwise, a bos before the text (Meta's tokenizer.json: both);
    - a SentencePiece vocabulary (`tokenizer.ggml.model` "llama") with `add_space_prefix` (default on): "▁"
      before every text, also after a special token (Meta's Llama 2 tokenizer.json: Prepend + Replace).
    Raises what `AutoTokenizer.from_pretrained` raises for an unreadable file.
    """
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers' own reader (what from_pretrained reads the file with): gguf.GGUFReader parses every array,
    # 12 s for Llama 3's 280k merges
    metadata, _ = read_gguf_metadata(str(path))
    prefix = "tokenizer.ggml."
    read = {key.removeprefix(prefix): value for key, value in metadata.items() if key.startswith(prefix)}
    backend = tokenizer.backend_tokenizer
    pre, add_bos = read.get("pre"), read.get("add_bos_token")
    if pre == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in LLAMA3_PRE_NAMES:
        backend.model.ignore_merges = True
        add_bos = True if add_bos is None else add_bos
    if read.get("model") == "llama" and read.get("add_space_prefix", True):
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
    if add_bos is not None and tokenizer.bos_token_id is not None:
        tokenizer.add_bos_token = bool(add_bos)  # rebuilds the post-processor
    return tokenizer
