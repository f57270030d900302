"""Training and merging a Llama 4 Mixture-of-Experts model, routed experts included (`targets: experts`).

The model is tests/tiny_models.py's tiny text-only Llama 4: 4 layers, MoE on layers 1 and 3 (4 routed experts,
top-1, and a shared expert), dense layers 0 and 2; here with experts of width 64, not 32: bitsandbytes 0.50's
CPU 4-bit inference needs a linear layer's input width to be a multiple of its block size (64), and the shared
expert's down_proj takes the expert width. The routed experts are two fused parameters per MoE layer,
`gate_up_proj` (4, 64, 128) and `down_proj` (4, 64, 64); PEFT adapts them through `target_parameters` with
rank `train.lora.expert_r` per expert.
"""

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    Llama4Config,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
)

from helpers import conversation, write_jsonl, write_run_file
from llamatailor.config import ModelSection, RunConfig, load_config
from llamatailor.data.prepare import prepare
from llamatailor.errors import ConfigError, ModelLoadError
from llamatailor.models.loading import ChatTokenizer, load_tokenizer
from llamatailor.models.moe import LLAMA4, expert_rank, moe_layout
from llamatailor.pipeline import STAGE_BY_NAME, run_stage
from llamatailor.train.model_setup import quantized_base, trainable_model
from llamatailor.train.sft import train_sft
from tiny_models import build_tiny_llama4

EXPERTS = 4
MOE_LAYERS = (1, 3)
FUSED = ("gate_up_proj", "down_proj")
SHAPES = {"gate_up_proj": (EXPERTS, 64, 128), "down_proj": (EXPERTS, 64, 64)}  # (E, H, 2I), (E, I, H)


@pytest.fixture(scope="module")
def llama4(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama4") / "tiny"
    return build_tiny_llama4(folder, seed=1, max_position_embeddings=256, intermediate_size=64)


@pytest.fixture(scope="module")
def llama4_chat(llama4) -> ChatTokenizer:
    """Loaded once per module (a 128k vocabulary takes over a second)."""
    return load_tokenizer(ModelSection(base=str(llama4)))


def run_config(folder: Path, model: Path, **train: object) -> RunConfig:
    """A run that teaches `model` to answer "ok"; `train` extends the train section (a lora key replaces it)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [conversation(f"Question number {n}?", "ok") for n in range(24)]
    run_file = write_run_file(
        folder,
        model,
        [write_jsonl(folder / "sft.jsonl", rows)],
        data={
            "system_prompt": "You answer with ok.",
            "max_seq_len": 96,
            "val_ratio": 0.15,
            "test_ratio": 0.15,
        },
        train={"max_steps": 6, "batch_size": 8, "learning_rate": 1e-2, "save_steps": 100, **train},
        eval={"max_new_tokens": 6, "json_fields": None, "batch_size": 8, "perplexity": False},
        export={"check_samples": 3, "gguf": ["f16"]},
    )
    return load_config(run_file)


def fused_names(layer: int) -> dict[str, str]:
    return {name: f"model.layers.{layer}.feed_forward.experts.{name}" for name in FUSED}


@pytest.mark.parametrize("targets", ["experts", "all-linear"])
def test_experts_preset_adapts_the_routed_experts_and_all_linear_leaves_them(
    targets, llama4, llama4_chat, tmp_path
):
    """Trained and merged (fp32): `experts` changes every fused expert tensor, all-linear leaves them bit for bit
    as they were; neither touches the router. The merged model equals the adapter model within the merge gate."""
    config = run_config(tmp_path, llama4, lora={"r": 8, "alpha": 16, "targets": targets})
    prepare(config, llama4_chat)
    train_sft(config)
    merged = run_stage(STAGE_BY_NAME["merge"], config)  # raises when the merge is not the adapter model
    assert merged.max_abs_logit_diff <= 1e-3 and merged.saved_max_abs_logit_diff <= 1e-3
    assert merged.greedy_identical == merged.greedy_compared == 3
    base = load_file(llama4 / "model.safetensors")
    after = load_file(config.run_dir.merged / "model.safetensors")
    for layer in MOE_LAYERS:
        router = f"model.layers.{layer}.{LLAMA4.router}.weight"
        assert torch.equal(after[router], base[router])
        for name, key in fused_names(layer).items():
            assert after[key].shape == SHAPES[name]
            moved = float((after[key] - base[key]).abs().max())
            if targets == "experts":
                # (an expert the top-1 router never picks on this data gets no gradient and stays as it was)
                assert moved > 1e-3, key
            else:
                assert moved == 0.0, key
    shared = "model.layers.1.feed_forward.shared_expert.down_proj.weight"
    assert not torch.equal(after[shared], base[shared])  # both presets adapt the shared expert
    if targets == "experts":
        assert_bf16_merge_passes(config)


def assert_bf16_merge_passes(config: RunConfig) -> None:
    """The experts' LoRA merged and saved in bf16 passes the merge gate (1e-3 plus the rounding yardstick)."""
    bf16 = config.model_copy(update={"export": config.export.model_copy(update={"merge_dtype": "bf16"})})
    merged = run_stage(STAGE_BY_NAME["merge"], bf16)
    assert merged.dtype == "bfloat16" and merged.max_abs_logit_diff <= 1e-3
    assert (
        merged.rounding_max_abs_logit_diff > 0 and merged.saved_max_abs_logit_diff <= merged.saved_tolerance
    )
    saved = load_file(config.run_dir.merged / "model.safetensors")
    assert saved["model.layers.3.feed_forward.experts.gate_up_proj"].dtype == torch.bfloat16


@pytest.mark.parametrize(("expert_r", "rank"), [("auto", 2), (3, 3)])
def test_expert_rank_sets_the_expert_adapters_shapes(expert_r, rank, llama4, llama4_chat, tmp_path):
    """r 8 on 4 experts: auto gives max(1, 8 // 4) = 2 per expert, or expert_r as set; linear layers keep r.
    PEFT stacks the experts' factors: lora_A (E·rank, d1), lora_B (d2, E·rank) for an (E, d2, d1) tensor."""
    lora = {"r": 8, "alpha": 16, "targets": "experts", "expert_r": expert_r}
    config = run_config(tmp_path, llama4, lora=lora)
    assert expert_rank(config.train.lora, EXPERTS) == rank
    model = trainable_model(config, llama4_chat, "fp32")
    params = dict(model.named_parameters())
    prefix = "base_model.model.model.layers.1.feed_forward"
    # PEFT nests one wrapper per fused parameter: down_proj outside, gate_up_proj within
    for wrapper, (_, d2, d1) in (
        ("experts.base_layer", SHAPES["gate_up_proj"]),
        ("experts", SHAPES["down_proj"]),
    ):
        assert params[f"{prefix}.{wrapper}.lora_A.default.weight"].shape == (EXPERTS * rank, d1)
        assert params[f"{prefix}.{wrapper}.lora_B.default.weight"].shape == (d2, EXPERTS * rank)
    assert params[f"{prefix}.shared_expert.up_proj.lora_A.default.weight"].shape == (8, 64)
    experts = model.base_model.model.model.layers[1].feed_forward.experts
    # alpha / rank per expert (PEFT's rule), as alpha / r on the linear layers
    assert experts.scaling["default"] == experts.base_layer.scaling["default"] == 16 / rank
    trainable = {name for name, param in params.items() if param.requires_grad}
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert not any("router" in name for name in trainable)
    # 7 linear layers x 4 layers, plus 2 fused parameters x 2 MoE layers, each an A and a B
    assert len(trainable) == 2 * (7 * 4 + 2 * 2)


def test_other_presets_leave_the_experts_frozen(llama4, llama4_chat, tmp_path):
    config = run_config(tmp_path, llama4, lora={"r": 8, "alpha": 16, "dropout": 0.05, "targets": "mlp"})
    model = trainable_model(config, llama4_chat, "fp32")
    adapted = {name for name, param in model.named_parameters() if param.requires_grad}
    assert adapted and not any("experts" in name or "router" in name for name in adapted)
    assert any("shared_expert.gate_proj.lora_A" in name for name in adapted)


def test_qlora_trains_with_experts_unquantized(llama4, llama4_chat, tmp_path):
    """QLoRA on the tiny Llama 4 with the experts adapted: the loss is finite and falls, the experts' adapters
    move, and the adapter merges into the base reloaded unquantized within the merge gate (what the export then
    writes is any merged Llama 4: tests/test_export_llama4.py)."""
    config = run_config(tmp_path, llama4, method="qlora", lora={"r": 8, "alpha": 16, "targets": "experts"})
    prepare(config, llama4_chat)
    result = train_sft(config)
    assert torch.isfinite(torch.tensor(result.last_loss)) and result.last_loss < result.first_loss
    adapter = load_file(config.run_dir.adapter / "adapter_model.safetensors")
    experts_b = [value for key, value in adapter.items() if ".experts." in key and "lora_B" in key]
    assert len(experts_b) == 4 and all(float(value.abs().max()) > 0 for value in experts_b)
    merged = run_stage(STAGE_BY_NAME["merge"], config)  # raises when the merge is not the adapter model
    assert merged.max_abs_logit_diff <= 1e-3 and merged.greedy_identical == merged.greedy_compared


def test_quantized_base_keeps_the_experts_in_the_compute_dtype(llama4, tmp_path, caplog):
    config = run_config(tmp_path, llama4, method="qlora")
    with caplog.at_level(logging.INFO, logger="llamatailor.train.model_setup"):
        base = quantized_base(config, "bf16")
    params = dict(base.named_parameters())
    for layer in MOE_LAYERS:
        for key in fused_names(layer).values():
            assert params[key].dtype == torch.bfloat16 and not params[key].requires_grad
    assert type(params["model.layers.1.self_attn.q_proj.weight"]).__name__ == "Params4bit"
    assert params["model.layers.1.input_layernorm.weight"].dtype == torch.float32  # norms go to fp32
    assert "routed experts stay in bfloat16" in caplog.text


def test_experts_on_a_dense_llama_is_refused(tiny_models, llama3, tmp_path):
    config = run_config(tmp_path, tiny_models["llama3"], lora={"targets": "experts"})
    with pytest.raises(ConfigError, match=r"train\.lora\.targets.*has no routed experts"):
        trainable_model(config, llama3, "fp32")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_mixtral_is_refused_by_name(method, tmp_path, llama3):
    """Routed experts in another layout than Llama 4's: refused for every method, naming the type and key."""
    shape = {"hidden_size": 32, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1}
    mixtral = MixtralConfig(vocab_size=64, num_hidden_layers=1, num_local_experts=2, **shape)
    MixtralForCausalLM(mixtral).save_pretrained(tmp_path / "mixtral")
    config = run_config(tmp_path / "run", tmp_path / "mixtral", method=method)
    with pytest.raises(ModelLoadError, match=r"model_type 'mixtral', num_local_experts: 2.*only Llama 4"):
        trainable_model(config, llama3, "fp32")


@pytest.mark.parametrize(
    ("config", "key"),
    [
        (Qwen2MoeConfig(num_experts=4).to_dict(), "num_experts"),
        ({"model_type": "deepseek_v3", "n_routed_experts": 256, "num_hidden_layers": 61}, "n_routed_experts"),
        ({"model_type": "new_moe", "expert_layout": "stacked"}, "expert_layout"),
    ],
)
def test_other_moe_layouts_are_refused(config, key):
    with pytest.raises(ModelLoadError, match=f"model_type '{config['model_type']}', {key}:"):
        moe_layout(config)


def test_layouts_recognised(llama4, tiny_models):
    assert moe_layout(AutoConfig.from_pretrained(llama4).to_dict()) is LLAMA4
    multimodal = Llama4Config(text_config={"num_local_experts": 16}).to_dict()  # experts under text_config
    assert moe_layout(multimodal) is LLAMA4 and LLAMA4.expert_count(multimodal) == 16
    assert moe_layout(AutoConfig.from_pretrained(tiny_models["llama3"]).to_dict()) is None


def test_expert_adapter_limits_are_refused_in_the_run_file(tmp_path):
    """PEFT's adapter on fused parameters has no DoRA and no dropout: refused by name; dropout defaults to 0."""
    model = tmp_path / "model"
    with pytest.raises(
        ConfigError, match=r"train\.lora\.dora .*got True: DoRA cannot go with targets: experts.*all-linear"
    ):
        run_config(tmp_path, model, lora={"targets": "experts", "dora": True})
    with pytest.raises(
        ConfigError, match=r"train\.lora\.dropout .*got 0\.1: dropout cannot go with targets: experts"
    ):
        run_config(tmp_path, model, lora={"targets": "experts", "dropout": 0.1})
    with pytest.raises(
        ConfigError, match=r"\(1 problem\)\n.*train\.lora\.expert_r .*got 0: expected a whole number"
    ):
        run_config(tmp_path, model, lora={"targets": "experts", "expert_r": 0})
    assert run_config(tmp_path, model, lora={"targets": "experts"}).train.lora.dropout == 0.0
    assert run_config(tmp_path, model, lora={"targets": "all-linear"}).train.lora.dropout == 0.05
