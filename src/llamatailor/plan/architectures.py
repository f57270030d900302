"""Model shapes for the planner: published Llama presets, or a config.json (local, cached hub, run file).

Numbers are the models' published configurations (Hugging Face `config.json` of each release).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamatailor.errors import ModelLoadError


@dataclass(frozen=True)
class Architecture:
    name: str
    layers: int
    hidden: int
    intermediate: int  # the dense MLP's, or one expert's for MoE layers
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    head_dim: int | None = None
    experts: int = 0  # routed experts per MoE layer (0: a dense model)
    experts_per_token: int = 1
    shared_expert: bool = False
    moe_every: int = 1  # every n-th layer is MoE (Llama 4 Maverick alternates)
    dense_intermediate: int | None = None  # the dense layers' MLP width in a MoE model

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_width(self) -> int:
        return self.heads * self.head_size

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_size

    @property
    def moe_layers(self) -> int:
        return self.layers // self.moe_every if self.experts else 0

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    def attention_linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each attention projection."""
        h = self.hidden
        return {
            "q_proj": (h, self.q_width),
            "k_proj": (h, self.kv_width),
            "v_proj": (h, self.kv_width),
            "o_proj": (self.q_width, h),
        }

    def mlp_linears(self, width: int) -> dict[str, tuple[int, int]]:
        return {
            "gate_proj": (self.hidden, width),
            "up_proj": (self.hidden, width),
            "down_proj": (width, self.hidden),
        }

    def layer_linear_params(self) -> int:
        """Linear weights of all layers (what QLoRA quantizes)."""
        attention = sum(i * o for i, o in self.attention_linears().values()) * self.layers
        dense_width = self.dense_intermediate or self.intermediate
        dense = 3 * self.hidden * dense_width * self.dense_layers
        per_expert = 3 * self.hidden * self.intermediate
        moe = self.moe_layers * (
            per_expert * (self.experts + int(self.shared_expert)) + self.hidden * self.experts
        )
        return attention + dense + moe

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    def total_params(self) -> int:
        return self.layer_linear_params() + self.embedding_params() + self.norm_params()

    def active_mlp_width(self) -> int:
        """MLP width a token passes through in an average layer (MoE: its experts plus the shared one)."""
        if not self.experts:
            return self.intermediate
        moe_width = self.intermediate * (self.experts_per_token + int(self.shared_expert))
        dense_width = self.dense_intermediate or self.intermediate
        return round((moe_width * self.moe_layers + dense_width * self.dense_layers) / self.layers)


def _llama(
    name: str,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv: int,
    vocab: int,
    tied: bool = False,
) -> Architecture:
    return Architecture(name, layers, hidden, intermediate, heads, kv, vocab, tied)


PRESETS: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        _llama("llama-1-65b", 80, 8192, 22016, 64, 64, 32000),
        _llama("llama-2-7b", 32, 4096, 11008, 32, 32, 32000),
        _llama("llama-2-13b", 40, 5120, 13824, 40, 40, 32000),
        _llama("llama-2-70b", 80, 8192, 28672, 64, 8, 32000),
        _llama("llama-3.2-1b", 16, 2048, 8192, 32, 8, 128256, tied=True),
        _llama("llama-3.2-3b", 28, 3072, 8192, 24, 8, 128256, tied=True),
        _llama("llama-3.1-8b", 32, 4096, 14336, 32, 8, 128256),
        _llama("llama-3.1-70b", 80, 8192, 28672, 64, 8, 128256),
        _llama("llama-3.3-70b", 80, 8192, 28672, 64, 8, 128256),
        _llama("llama-3.1-405b", 126, 16384, 53248, 128, 8, 128256),
        Architecture(
            "llama-4-scout",
            48,
            5120,
            8192,
            40,
            8,
            202048,
            head_dim=128,
            experts=16,
            shared_expert=True,
            dense_intermediate=16384,
        ),
        Architecture(
            "llama-4-maverick",
            48,
            5120,
            8192,
            40,
            8,
            202048,
            head_dim=128,
            experts=128,
            shared_expert=True,
            moe_every=2,
            dense_intermediate=16384,
        ),
        _llama("smollm2-135m-instruct", 30, 576, 1536, 9, 3, 49152, tied=True),
    )
}


def from_config(name: str, config: dict[str, Any]) -> Architecture:
    """An architecture from a Hugging Face config.json (Llama, or Llama 4's text part).

    Args:
        name: What the plan calls the model.
        config: The parsed config.json.

    Raises:
        ModelLoadError: a key a Llama config has (layers, widths, heads, vocabulary) is missing.
    """
    text = config.get("text_config", config)
    try:
        experts = int(text.get("num_local_experts", 0) or 0)
        return Architecture(
            name=name,
            layers=int(text["num_hidden_layers"]),
            hidden=int(text["hidden_size"]),
            intermediate=int(text["intermediate_size"]),
            heads=int(text["num_attention_heads"]),
            kv_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
            vocab=int(text["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            head_dim=text.get("head_dim"),
            experts=experts,
            experts_per_token=int(text.get("num_experts_per_tok", 1) or 1),
            shared_expert=experts > 0,
            moe_every=int(text.get("interleave_moe_layer_step", 1) or 1),
            dense_intermediate=text.get("intermediate_size_mlp"),
        )
    except KeyError as exc:
        raise ModelLoadError(
            f"{name}: config.json has no {exc.args[0]!r}; is this a Llama-architecture model?"
        ) from None


def load_architecture(spec: str) -> Architecture:
    """A preset name, a folder with config.json, or a hub id whose config.json is in the local cache.

    Raises:
        ModelLoadError: `spec` is none of these (nothing is downloaded), or its config.json lacks a key.
    """
    if spec in PRESETS:
        return PRESETS[spec]
    folder = Path(spec).expanduser()
    if (folder / "config.json").is_file():
        return from_config(folder.name, json.loads((folder / "config.json").read_text(encoding="utf-8")))
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json") if "/" in spec else None
    if isinstance(cached, str):
        return from_config(spec, json.loads(Path(cached).read_text(encoding="utf-8")))
    raise ModelLoadError(
        f"no architecture for {spec!r}: not a preset ({', '.join(PRESETS)}), a folder with config.json, "
        "or a hub id whose config.json is in the local Hugging Face cache"
    )
