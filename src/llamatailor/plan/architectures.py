"""Model shapes for the planner: published Llama presets, or a config.json (local, cached hub, run file).

Numbers are the models' published configurations (Hugging Face `config.json` of each release).
"""

import difflib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llamatailor.errors import ModelLoadError
from llamatailor.models.moe import local_config_json, moe_layout
from llamatailor.models.source import resolve_source

LLAMA4_NO_ROPE_EVERY = 4  # transformers' default no_rope_layer_interval: every 4th layer has no RoPE
LLAMA4_ATTENTION_CHUNK = 8192  # transformers' default attention_chunk_size (RoPE layers)


@dataclass(frozen=True)
class Architecture:
    """A decoder's shape: enough to count its parameters and the memory a training step or a served model
    needs. Widths are features; counts are layers or experts."""

    name: str
    layers: int
    hidden: int
    intermediate: int  # the dense MLP's, or one expert's (routed or shared) in a MoE model
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
    qk_norm_layers: int = 0  # layers with Llama 4's L2 norm on queries and keys (its RoPE layers)
    chunked_layers: int = 0  # layers whose attention sees only its chunk of `attention_chunk` tokens
    attention_chunk: int = 0

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

    @property
    def dense_width(self) -> int:
        """The MLP width of the dense layers (every layer of a dense model)."""
        return self.dense_intermediate or self.intermediate

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

    def expert_parameters(self) -> dict[str, tuple[int, int]]:
        """(rows, columns) per expert of each fused routed-expert parameter, as transformers' Llama 4 holds
        them: gate_up_proj (E, hidden, 2·I) and down_proj (E, I, hidden)."""
        return {
            "gate_up_proj": (self.hidden, 2 * self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }

    def attention_params(self) -> int:
        """The q, k, v and o projections' weights of all layers."""
        return sum(i * o for i, o in self.attention_linears().values()) * self.layers

    def routed_expert_params(self) -> int:
        """All routed experts' weights (each token uses `experts_per_token` of them in a MoE layer)."""
        return self.moe_layers * self.experts * 3 * self.hidden * self.intermediate

    def shared_and_dense_mlp_params(self) -> int:
        """The shared expert of each MoE layer and the MLP of each dense layer: ordinary linear layers."""
        shared = self.moe_layers * 3 * self.hidden * self.intermediate if self.shared_expert else 0
        return shared + self.dense_layers * 3 * self.hidden * self.dense_width

    def router_params(self) -> int:
        """The routers' weights: hidden x E per MoE layer."""
        return self.moe_layers * self.hidden * self.experts

    def layer_linear_params(self) -> int:
        """Weights of all decoder layers' matrices: attention, MLPs, routed experts and routers."""
        return (
            self.attention_params()
            + self.routed_expert_params()
            + self.shared_and_dense_mlp_params()
            + self.router_params()
        )

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    def total_params(self) -> int:
        return self.layer_linear_params() + self.embedding_params() + self.norm_params()

    def active_params(self) -> int:
        """Parameters one token passes through: all but the routed experts it is not sent to (the usual
        "active parameters" of a MoE model, embeddings and output head included)."""
        unused = (
            self.moe_layers * (self.experts - self.experts_per_token) * 3 * self.hidden * self.intermediate
        )
        return self.total_params() - unused


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


def _llama4(name: str, experts: int, moe_every: int, qk_norm: bool) -> Architecture:
    rope_layers = 48 - 48 // LLAMA4_NO_ROPE_EVERY
    return Architecture(
        name,
        48,
        5120,
        8192,
        40,
        8,
        202048,
        head_dim=128,
        experts=experts,
        shared_expert=True,
        moe_every=moe_every,
        dense_intermediate=16384,
        qk_norm_layers=rope_layers if qk_norm else 0,
        chunked_layers=rope_layers,
        attention_chunk=LLAMA4_ATTENTION_CHUNK,
    )


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
        # Llama-4-Scout-17B-16E and Llama-4-Maverick-17B-128E (text_config): 48 layers, 16 experts in every
        # layer, or 128 in every 2nd with dense MLPs of 16384 between; every 4th layer has no RoPE; QK norm
        # on Scout's RoPE layers only (Maverick's use_qk_norm is false); chunked attention on RoPE layers.
        _llama4("llama-4-scout", experts=16, moe_every=1, qk_norm=True),
        _llama4("llama-4-maverick", experts=128, moe_every=2, qk_norm=False),
        _llama("smollm2-135m-instruct", 30, 576, 1536, 9, 3, 49152, tied=True),
    )
}


def from_config(name: str, config: dict[str, Any]) -> Architecture:
    """An architecture from a Hugging Face config.json: a Llama, or Llama 4 (its text part, MoE included).

    Llama 4's keys follow transformers' `Llama4TextConfig`: MoE layers every `interleave_moe_layer_step`-th
    (or those listed in `moe_layers`), `no_rope_layers` (1: RoPE, 0: none; default every 4th without),
    `use_qk_norm` on RoPE layers, `attention_chunk_size` for RoPE layers' chunked attention.

    Args:
        name: What the plan calls the model.
        config: The parsed config.json.

    Raises:
        ModelLoadError: a key a Llama config has (layers, widths, heads, vocabulary) is missing; or the model
            has routed experts in a layout other than Llama 4's (`models.moe.moe_layout`: Mixtral, Qwen-MoE,
            DeepSeek...), whose memory the planner cannot count.
    """
    text = config.get("text_config", config)
    layout = moe_layout(config)
    try:
        layers = int(text["num_hidden_layers"])
        arch = Architecture(
            name=name,
            layers=layers,
            hidden=int(text["hidden_size"]),
            intermediate=int(text["intermediate_size"]),
            heads=int(text["num_attention_heads"]),
            kv_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
            vocab=int(text["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            head_dim=text.get("head_dim"),
        )
    except KeyError as exc:
        raise ModelLoadError(
            f"{name}: config.json has no {exc.args[0]!r}; is this a Llama-architecture model?"
        ) from None
    return arch if layout is None else _with_llama4_moe(arch, text)


def _with_llama4_moe(arch: Architecture, text: dict[str, Any]) -> Architecture:
    """`arch` with Llama 4's experts, interleaving, RoPE-free layers, QK norm and chunked attention."""
    step = int(text.get("interleave_moe_layer_step") or 1)
    listed = text.get("moe_layers")
    if listed and sorted(listed) != list(range(step - 1, arch.layers, step)):
        raise ModelLoadError(
            f"{arch.name}: config.json lists moe_layers {listed}, not every {step}-th layer "
            "(interleave_moe_layer_step); the planner counts only evenly interleaved MoE layers"
        )
    interval = int(text.get("no_rope_layer_interval") or LLAMA4_NO_ROPE_EVERY)
    uses_rope = text.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(arch.layers)]
    rope_layers = sum(1 for flag in uses_rope if flag)
    chunk = int(text.get("attention_chunk_size", LLAMA4_ATTENTION_CHUNK) or 0)
    return replace(
        arch,
        experts=int(text["num_local_experts"]),
        experts_per_token=int(text.get("num_experts_per_tok") or 1),
        shared_expert=True,
        moe_every=step,
        dense_intermediate=text.get("intermediate_size_mlp"),
        qk_norm_layers=rope_layers if text.get("use_qk_norm", True) else 0,
        chunked_layers=rope_layers if chunk else 0,
        attention_chunk=chunk,
    )


# The hub releases each preset's shape is: base and instruct ("-Instruct" is added to each name but Llama 2's
# and 3.3's), under Meta's current and earlier repository names (Llama 3 and 3.1 share their shapes).
HUB_RELEASES: dict[str, tuple[str, ...]] = {
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf"),
    "llama-2-13b": ("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-chat-hf"),
    "llama-2-70b": ("meta-llama/Llama-2-70b-hf", "meta-llama/Llama-2-70b-chat-hf"),
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B",),
    "llama-3.2-3b": ("meta-llama/Llama-3.2-3B",),
    "llama-3.1-8b": ("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
    "llama-3.1-70b": (
        "meta-llama/Meta-Llama-3-70B",
        "meta-llama/Meta-Llama-3.1-70B",
        "meta-llama/Llama-3.1-70B",
    ),
    "llama-3.1-405b": ("meta-llama/Meta-Llama-3.1-405B", "meta-llama/Llama-3.1-405B"),
    "llama-3.3-70b": ("meta-llama/Llama-3.3-70B-Instruct",),
    "llama-4-scout": ("meta-llama/Llama-4-Scout-17B-16E",),
    "llama-4-maverick": ("meta-llama/Llama-4-Maverick-17B-128E",),
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M",),
}


def hub_presets() -> dict[str, str]:
    """Hub id, as its repository spells it -> the preset of its shape (HUB_RELEASES). A fine-tune keeps its
    base's shape but not its id: it is planned from its cached config.json or a folder."""
    found = {}
    for preset, names in HUB_RELEASES.items():
        for name in names:
            found[name] = preset
            if "Llama-2" not in name and not name.endswith("-Instruct"):
                found[f"{name}-Instruct"] = preset
    return found


def load_architecture(spec: str) -> Architecture:
    """A preset name, a folder with config.json, a hub id whose config.json is in the local cache, or the
    hub id of a release a preset describes (`hub_presets`; its cached config.json wins when there is one).

    Raises:
        ModelLoadError: `spec` is none of these (nothing is downloaded), or its config.json lacks a key.
    """
    if spec in PRESETS:
        return PRESETS[spec]
    path = local_config_json(spec)
    if path is not None:
        folder = Path(spec).expanduser()
        name = folder.name if path.parent == folder else spec
        return from_config(name, json.loads(path.read_text(encoding="utf-8")))
    releases = hub_presets()
    preset = {name.lower(): preset for name, preset in releases.items()}.get(spec.lower())
    if preset is not None:
        return replace(PRESETS[preset], name=f"{spec} (preset {preset})")
    close = difflib.get_close_matches(spec, [*PRESETS, *releases], n=1, cutoff=0.8)
    raise ModelLoadError(
        f"no architecture for {spec!r}: not a preset ({', '.join(PRESETS)}), a folder with config.json, "
        "a hub id whose config.json is in the local Hugging Face cache, or the hub id of a preset's release"
        + (f"; did you mean {close[0]!r}?" if close else "")
    )


def base_architecture(base: str) -> Architecture:
    """The architecture of a run file's `model.base`, named as the run file names it (an alias or GGUF file
    resolves to a converted folder whose name means nothing to the user).

    Raises:
        ModelLoadError: as `load_architecture`, or `base` is no kind of model source (`resolve_source`).
    """
    location = resolve_source(base).location
    arch = load_architecture(location)
    return arch if location == base else replace(arch, name=base)
