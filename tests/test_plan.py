"""The planner: its formulas against autograd and real models, published figures, and the CLI verdict."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from helpers import alpaca_rows, prepared_run
from llamatailor.cli import app
from llamatailor.config import LoraSection, RunConfig, Schedule, load_config
from llamatailor.errors import ConfigError, ModelLoadError, StageError
from llamatailor.hardware import resolve_precision
from llamatailor.models.families import FAMILIES
from llamatailor.models.loading import load_tokenizer
from llamatailor.models.moe import check_run_model
from llamatailor.plan.architectures import (
    HUB_RELEASES,
    PRESETS,
    base_architecture,
    from_config,
    load_architecture,
)
from llamatailor.plan.inference import inference_estimate
from llamatailor.plan.memory import (
    GIB,
    Setup,
    estimate,
    largest_trainable,
    layer_activation_bytes,
    layer_activation_elements,
    trainable_parameters,
    weight_bytes,
)
from llamatailor.plan.run_setup import setup_from_config
from llamatailor.train.arguments import optimizer_name
from llamatailor.train.model_setup import lora_config, trainable_model
from llamatailor.vocabulary import ATTENTION_LINEARS, LORA_TARGET_PRESETS, MLP_LINEARS, OPTIMIZERS

runner = CliRunner()
GB = 1e9
SCOUT = Path(__file__).parent / "data" / "llama4-scout"  # meta-llama/Llama-4-Scout-17B-16E-Instruct's config
SCOUT_CONFIG = json.loads((SCOUT / "config.json").read_text(encoding="utf-8"))


def saved_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one forward pass, parameters not counted."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=tokens, labels=tokens)
    return sum(saved.values())


def built(shape: dict, layers: int, setup: Setup) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=300, num_hidden_layers=layers, tie_word_embeddings=False, **shape)
    )
    if setup.method == "full":
        return model.train()
    model.requires_grad_(False)
    return get_peft_model(
        model, LoraConfig(r=setup.lora_r, target_modules=list(setup.lora_targets), lora_dropout=0.0)
    ).train()


SHAPES = [
    {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
    {"hidden_size": 96, "intermediate_size": 200, "num_attention_heads": 6, "num_key_value_heads": 6},
]
SETUPS = [
    Setup(method="full"),
    Setup(method="lora", lora_r=8, lora_targets=ATTENTION_LINEARS + MLP_LINEARS),
    Setup(method="lora", lora_r=4, lora_targets=ATTENTION_LINEARS),
    Setup(method="lora", lora_r=8, lora_targets=MLP_LINEARS),
    Setup(method="lora", lora_r=16, lora_targets=("q_proj", "v_proj", "down_proj")),
]


@pytest.mark.parametrize("shape", SHAPES, ids=["gqa", "mha"])
@pytest.mark.parametrize("setup", SETUPS, ids=["full", "all-linear", "attention", "mlp", "q-v-down"])
def test_layer_activation_count_equals_what_autograd_saves(shape, setup):
    tokens = torch.randint(0, 300, (2, 48))
    # Layers 2 and 3 against 2: the first layer of an MLP-only adapter has no gradient to pass back yet.
    two, three = (saved_bytes(built(shape, layers, setup), tokens) for layers in (2, 3))
    per_layer_per_token = (three - two) / tokens.numel() / 4  # fp32 elements
    arch = from_config("probe", {**shape, "num_hidden_layers": 2, "vocab_size": 300})
    assert per_layer_per_token == layer_activation_elements(arch, setup)


def test_weights_and_trainable_parameters_match_real_models(tmp_path, tiny_models):
    arch = from_config("tiny", json.loads((tiny_models["chatml"] / "config.json").read_text()))
    for train in (
        {"method": "lora", "lora": {"r": 8, "dora": True}},
        {"method": "qlora"},
        {"method": "full"},
    ):
        folder = tmp_path / train["method"]
        run_file = prepared_run(folder, tiny_models["chatml"], alpaca_rows(4), train=train)
        config = load_config(run_file)
        model = trainable_model(config, load_tokenizer(config.model), "fp32")
        setup = setup_from_config(config, arch)
        actual_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable_parameters(arch, setup) == actual_trainable, train
        # On CPU the optimizer step's temporaries are sized by the largest tensor that trains.
        largest = max(p.numel() for p in model.parameters() if p.requires_grad)
        assert largest_trainable(arch, setup) == largest, train
        frozen = [p for p in model.parameters() if not p.requires_grad]
        actual_weights = sum(p.numel() * p.element_size() for p in frozen)
        actual_weights += sum(
            p.quant_state.absmax.numel() * p.quant_state.absmax.element_size()
            + p.quant_state.state2.absmax.numel() * 4
            for p in frozen
            if getattr(p, "quant_state", None) is not None
        )
        if train["method"] == "full":
            actual_weights = sum(p.numel() * 4 for p in model.parameters())
        assert weight_bytes(arch, setup) == pytest.approx(actual_weights, rel=0.01), train


def test_presets_have_their_published_sizes():
    published = {
        "llama-2-7b": 6.74e9,
        "llama-2-70b": 68.98e9,
        "llama-3.2-1b": 1.24e9,
        "llama-3.2-3b": 3.21e9,
        "llama-3.1-8b": 8.03e9,
        "llama-3.1-70b": 70.55e9,
        "llama-3.1-405b": 405.85e9,
        "llama-4-scout": 109e9,  # with its vision encoder; the text model is what is trained here
        "llama-4-maverick": 400e9,
        "smollm2-135m-instruct": 134.5e6,
    }
    for name, size in published.items():
        assert PRESETS[name].total_params() == pytest.approx(size, rel=0.02), name


def test_published_peak_memory_figures_within_20_percent():
    # QLoRA (Dettmers et al. 2023): LLaMA 65B on one 48 GB GPU; batch 1, sequence 512, gradient
    # checkpointing, LoRA r=64 on all linear layers in bf16, paged 32-bit AdamW: about 45 GB.
    qlora_paper = Setup(
        method="qlora", seq_len=512, micro_batch=1, optimizer="paged_adamw_32bit", lora_r=64, adapter_bytes=2
    )
    assert estimate(PRESETS["llama-1-65b"], qlora_paper).total / GB == pytest.approx(45, rel=0.2)
    # torchtune README, "Memory and training speed": Llama 3.1 8B, batch 2, packed sequence 2048, their
    # single-device configs (bf16, activation checkpointing, LoRA r=8, chunked cross-entropy):
    # LoRA (q, v, output projections and MLP) on an RTX 4090: 16.2 GiB; QLoRA (all linear): 7.4 GiB.
    torchtune = Setup(seq_len=2048, micro_batch=2, lora_r=8, adapter_bytes=2, loss="chunked")
    lora = replace(torchtune, method="lora", lora_targets=("q_proj", "v_proj", "o_proj", *MLP_LINEARS))
    qlora = replace(torchtune, method="qlora", lora_targets=ATTENTION_LINEARS + MLP_LINEARS)
    assert estimate(PRESETS["llama-3.1-8b"], lora).total / GIB == pytest.approx(16.2, rel=0.2)
    assert estimate(PRESETS["llama-3.1-8b"], qlora).total / GIB == pytest.approx(7.4, rel=0.2)


def test_70b_qlora_does_not_fit_one_24gb_gpu_and_the_plan_says_what_does():
    result = runner.invoke(
        app, ["plan", "--model", "llama-3.1-70b", "--method", "qlora", "--gpu-mem", "24", "--json"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    qlora = plan["methods"]["qlora"]
    assert not qlora["fits"] and qlora["total_gib"] > 24 and qlora["max_micro_batch"] == 0
    assert plan["recommended"] is None
    assert qlora["gpus_needed_with_fsdp"] == 4
    assert any("qlora fits on 4 such GPUs with FSDP" in line for line in plan["advice"])
    assert any("QLoRA of llama-2-13b fits" in line for line in plan["advice"])
    eight_b = json.loads(
        runner.invoke(app, ["plan", "--model", "llama-3.1-8b", "--gpu-mem", "24", "--json"]).output
    )
    assert (
        eight_b["methods"]["qlora"]["fits"]
        and eight_b["methods"]["lora"]["fits"]
        and eight_b["recommended"] == "lora"
    )
    table = runner.invoke(
        app, ["plan", "--model", "llama-3.1-70b", "--method", "qlora", "--gpu-mem", "24"]
    ).output
    for term in (
        "weights",
        "gradients",
        "optimizer states",
        "activations",
        "logits and loss",
        "overhead",
        "peak total",
    ):
        assert term in table


def test_plan_reads_a_run_file_and_its_overrides(tmp_path, tiny_models):
    run_file = prepared_run(
        tmp_path, tiny_models["chatml"], alpaca_rows(4), train={"method": "qlora", "batch_size": 2}
    )
    result = runner.invoke(app, ["plan", str(run_file), "data.max_seq_len=256", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert (
        plan["setup"]["method"] == "qlora"
        and plan["setup"]["seq_len"] == 256
        and plan["setup"]["micro_batch"] == 2
    )
    assert plan["device"] == "cpu" and plan["setup"]["precision"] == "fp32"


def test_bad_plan_options_are_named():
    result = runner.invoke(app, ["plan", "--model", "llama-3.1-8b", "--method", "qlor"])
    assert result.exit_code == 2 and "--method 'qlor': expected one of lora, qlora, full" in result.output
    result = runner.invoke(app, ["plan", "--model", "llama-9"])
    assert result.exit_code == 1 and "no architecture for 'llama-9'" in result.output


def test_train_plans_first_and_warns_when_the_run_will_not_fit(tmp_path, tiny_models):
    from llamatailor.plan.run_setup import fit_warning, planned_peak

    run_file = prepared_run(tmp_path, tiny_models["chatml"], alpaca_rows(8), train={"batch_size": 4})
    peak = planned_peak(load_config(run_file))
    assert peak is not None and 0.1 * GIB < peak < 4 * GIB
    assert fit_warning(peak, peak) is None
    message = fit_warning(peak, peak // 2)
    assert message.startswith(
        f"the planner puts this run's peak at {peak / GIB:.1f} GiB per device, more than"
    )
    assert "`llamatailor plan RUN.yaml` shows the terms and what fits" in message


OPTIMIZER_NAMES = "adamw, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit"


def known_names(attempt, candidates):
    """The candidates `attempt` takes; a StageError (a GPU-only optimizer on CPU) still means known."""
    known = set()
    for name in candidates:
        try:
            attempt(name)
        except StageError:
            pass
        except (ConfigError, ValueError):  # pydantic's ValidationError is a ValueError
            continue
        known.add(name)
    return known


def planned_with_targets(targets, arch=PRESETS["llama-3.1-8b"]):
    config = RunConfig.model_validate({"name": "t", "data": {"train": ["a.jsonl"]}})
    # past validation, as a stray name would be; no dropout, which an adapter on experts refuses
    config.train.lora = LoraSection.model_construct(targets=targets, dropout=0.0)
    return setup_from_config(config, arch)


def test_schema_planner_and_trainer_know_the_same_optimizers():
    candidates = (*OPTIMIZERS, "adamw9", "AdamW", "sgd", "adamw_torch")
    schema = known_names(lambda name: Schedule(optimizer=name), candidates)
    planner = known_names(lambda name: Setup(optimizer=name), candidates)
    trainer = known_names(
        lambda name: optimizer_name(Schedule.model_construct(optimizer=name), "train"), candidates
    )
    assert schema == planner == trainer == set(OPTIMIZER_NAMES.split(", "))


def test_an_unknown_optimizer_is_refused_by_name_not_planned_as_adamw():
    with pytest.raises(ConfigError) as planned:
        Setup(optimizer="adamw9")
    assert str(planned.value) == f"unknown optimizer 'adamw9': expected one of {OPTIMIZER_NAMES}"
    with pytest.raises(ConfigError) as trained:
        optimizer_name(Schedule.model_construct(optimizer="adamw9"), "dpo")
    assert (
        str(trained.value) == f"dpo.optimizer: unknown optimizer 'adamw9': expected one of {OPTIMIZER_NAMES}"
    )
    result = runner.invoke(app, ["plan", "--model", "llama-3.1-8b", "--optimizer", "adamw9"])
    assert (
        result.exit_code == 2 and f"--optimizer 'adamw9': expected one of {OPTIMIZER_NAMES}" in result.output
    )
    # 8-bit states: two bytes per trainable parameter, not AdamW's 2 x 4 for fp32 adapters.
    arch = PRESETS["llama-3.1-8b"]
    adamw, eight_bit = (estimate(arch, Setup(optimizer=name)) for name in ("adamw", "adamw_8bit"))
    assert adamw.optimizer == 8 * adamw.trainable_parameters
    assert eight_bit.optimizer == 2 * eight_bit.trainable_parameters


def test_schema_planner_and_trainer_know_the_same_lora_target_presets():
    candidates = (*LORA_TARGET_PRESETS, "attn", "all_linear", "q_proj", "")
    schema = known_names(lambda name: LoraSection(targets=name), candidates)
    # On a Mixture-of-Experts model (Llama 4 Scout), where every preset applies.
    planner = known_names(lambda name: planned_with_targets(name, PRESETS["llama-4-scout"]), candidates)
    trainer = known_names(
        lambda name: lora_config(LoraSection.model_construct(targets=name), FAMILIES["llama4"], SCOUT_CONFIG),
        candidates,
    )
    assert schema == planner == trainer == {"attention", "mlp", "all-linear", "experts"}
    assert planned_with_targets("experts", PRESETS["llama-4-scout"]).lora_experts
    assert not planned_with_targets("all-linear", PRESETS["llama-4-scout"]).lora_experts
    all_linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for preset, modules in {
        "attention": {"q_proj", "k_proj", "v_proj", "o_proj"},
        "mlp": {"gate_proj", "up_proj", "down_proj"},
        "all-linear": all_linear,
        "experts": all_linear,  # plus the routed experts' fused parameters, which are not modules
    }.items():
        assert set(planned_with_targets(preset, PRESETS["llama-4-scout"]).lora_targets) == modules
        trained = lora_config(LoraSection(targets=preset), FAMILIES["llama4"], SCOUT_CONFIG).target_modules
        assert set(trained) == modules


def test_an_unknown_lora_target_preset_is_refused_by_name():
    message = (
        "train.lora.targets: unknown LoRA target preset 'attn': expected one of attention, mlp, all-linear, "
        "experts"
    )
    with pytest.raises(ConfigError) as planned:
        planned_with_targets("attn")
    assert str(planned.value) == message
    with pytest.raises(ConfigError) as trained:
        lora_config(LoraSection.model_construct(targets="attn"), FAMILIES["chatml"])
    assert str(trained.value) == message
    result = runner.invoke(app, ["plan", "--model", "llama-3.1-8b", "--lora-targets", "q_proj,attn"])
    assert result.exit_code == 2
    assert (
        "--lora-targets 'q_proj,attn': 'attn' is neither a preset (attention, mlp, all-linear, experts) nor a linear "
        "layer the planner counts (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
    ) in " ".join(result.output.split())
    result = runner.invoke(
        app, ["plan", "--model", "llama-3.1-8b", "--lora-targets", "q_proj, v_proj", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["setup"]["lora_targets"] == ["q_proj", "v_proj"]


# Llama 4 (Mixture of Experts). The tiny shape keeps Llama 4's structure: a shared expert beside the routed
# ones, QK norm on RoPE layers, dense layers of another width between MoE layers when interleaved.
TINY_LLAMA4 = {
    "model_type": "llama4_text",
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 32,
    "intermediate_size_mlp": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_local_experts": 4,
    "num_experts_per_tok": 1,
    "tie_word_embeddings": False,
}
EXPERT_PARAMETERS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]


def built_llama4(layers: int, step: int, setup: Setup) -> torch.nn.Module:
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    shape = {key: value for key, value in TINY_LLAMA4.items() if key != "model_type"}
    config = Llama4TextConfig(num_hidden_layers=layers, interleave_moe_layer_step=step, **shape)
    model = Llama4ForCausalLM(config).requires_grad_(False)
    lora = LoraConfig(
        r=setup.lora_r,
        target_modules=list(setup.lora_targets),
        target_parameters=EXPERT_PARAMETERS if setup.lora_experts else None,
        rank_pattern={name: setup.expert_r for name in EXPERT_PARAMETERS} if setup.lora_experts else {},
        lora_dropout=0.0,
    )
    return get_peft_model(model, lora).train()


LLAMA4_SETUPS = [
    Setup(method="lora", lora_r=8, lora_targets=ATTENTION_LINEARS + MLP_LINEARS),
    Setup(
        method="lora", lora_r=8, lora_targets=ATTENTION_LINEARS + MLP_LINEARS, lora_experts=True, expert_r=3
    ),
    Setup(method="lora", lora_r=4, lora_targets=ATTENTION_LINEARS),
]


# PEFT 0.21 warns that rank_pattern keys naming target_parameters match no module, yet applies them.
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")
@pytest.mark.parametrize("step", [1, 2], ids=["moe-layer", "dense-layer"])
@pytest.mark.parametrize("setup", LLAMA4_SETUPS, ids=["all-linear", "experts", "attention"])
def test_llama4_layer_activations_and_adapters_equal_what_torch_holds(step, setup):
    tokens = torch.randint(0, 300, (2, 48))
    two, three = (built_llama4(layers, step, setup) for layers in (2, 3))
    added = saved_bytes(three, tokens) - saved_bytes(two, tokens)  # layer 2: a RoPE layer, MoE at step 1
    arch = from_config("tiny", {**TINY_LLAMA4, "num_hidden_layers": 3, "interleave_moe_layer_step": step})
    planned = replace(setup, seq_len=48, micro_batch=2, precision="fp32", device="cpu")
    assert added == layer_activation_bytes(arch, planned, moe=step == 1, qk_norm=True)
    trainable = [p for p in three.parameters() if p.requires_grad]
    assert trainable_parameters(arch, planned) == sum(p.numel() for p in trainable)
    assert largest_trainable(arch, planned) == max(p.numel() for p in trainable)


def test_llama4_presets_match_the_published_config_and_sizes():
    scout = from_config("llama-4-scout", SCOUT_CONFIG)
    assert scout == PRESETS["llama-4-scout"]
    assert (scout.moe_layers, scout.dense_layers, scout.qk_norm_layers, scout.chunked_layers) == (
        48,
        0,
        36,
        36,
    )
    maverick = PRESETS["llama-4-maverick"]  # 128 experts in every 2nd layer, dense MLPs of 16384 between
    assert (maverick.moe_layers, maverick.dense_layers, maverick.dense_width) == (24, 24, 16384)
    # Meta's model cards: Scout 109B total (with its vision encoder, ~0.9B), Maverick 400B; 17B active.
    for name, total in (("llama-4-scout", 109e9), ("llama-4-maverick", 400e9)):
        assert PRESETS[name].total_params() == pytest.approx(total, rel=0.02), name
        assert PRESETS[name].active_params() == pytest.approx(17e9, rel=0.02), name


def test_scout_plan_for_one_80_gib_gpu_from_its_config(tmp_path):
    result = runner.invoke(app, ["plan", "--model", str(SCOUT), "--gpu-mem", "80", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["model"] == "llama4-scout" and plan["active_parameters"] == 17_172_894_720
    qlora = plan["methods"]["qlora"]
    # llamatailor's QLoRA keeps the 96.6B routed-expert weights in bf16: 180 GiB, nowhere near 80.
    assert qlora["weight_terms_bytes"]["routed experts"] == 2 * 48 * 16 * 3 * 5120 * 8192
    assert qlora["weight_terms_bytes"]["attention"] == round(48 * 62_914_560 * 4.127 / 8)
    assert not any(method["fits"] for method in plan["methods"].values()) and plan["recommended"] is None
    assert any("--expert-bits 4" in line and "and fits" in line for line in plan["advice"])
    inference = plan["inference"]
    assert [inference[width]["fits"] for width in ("4-bit", "8-bit", "16-bit")] == [True, False, False]
    assert inference["4-bit"]["kv_cache_bytes"] == 2 * 1024 * 2 * 48 * 8192
    table = runner.invoke(app, ["plan", "--model", str(SCOUT), "--gpu-mem", "80"]).output
    for term in (
        "routed experts",
        "shared expert and dense MLP",
        "router",
        "attention",
        "embeddings and head",
    ):
        assert f"  {term}" in table, term
    assert "serving llama4-scout" in table and "17.17B active" in table
    trained = runner.invoke(app, ["plan", "--model", str(SCOUT), "--lora-targets", "experts", "--json"])
    lora = json.loads(trained.output)["methods"]["lora"]
    # auto rank 16 // 16 = 1 per expert: 48 layers x 16 x ((5120 + 16384) + (8192 + 5120))
    assert lora["expert_adapter_parameters"] == 48 * 16 * (5120 + 16384 + 8192 + 5120)
    assert lora["expert_adapter_optimizer_bytes"] == 8 * lora["expert_adapter_parameters"]
    shown = runner.invoke(
        app, ["plan", "--model", str(SCOUT), "--lora-targets", "experts", "--gpu-mem", "80"]
    )
    assert "routed experts LoRA r=1 per expert" in " ".join(shown.output.split())  # auto, resolved


def test_published_llama4_memory_figures_within_15_percent():
    scout = PRESETS["llama-4-scout"]
    # Axolotl, examples/llama-4/scout-qlora-single-h100-flex.yaml (README: 64.5 GB on one H100 at 4k
    # context; Axolotl logs memory in GiB, torch.cuda.memory_allocated / 1024**3): experts linearized and
    # NF4 (llama4_linearized_experts, load_in_4bit), lora_r 32 on q/k/v/o and the shared expert's
    # gate/up/down (Scout has no dense layers: all-linear), sequence_len 4096 packed, micro_batch_size 1,
    # gradient checkpointing, Cut Cross Entropy (never builds the logits: the fused loss), bf16;
    # optimizer adamw_torch_4bit, which the planner lacks: adamw_8bit's states differ by 1 byte x 112M
    # adapter parameters, 0.1 GiB. Checkpoint offload and the vision tower (~0.9B) are not planned.
    axolotl = Setup(
        method="qlora",
        seq_len=4096,
        micro_batch=1,
        lora_r=32,
        lora_targets=ATTENTION_LINEARS + MLP_LINEARS,
        expert_bits=4,
        optimizer="adamw_8bit",
        loss="fused",
    )
    assert estimate(scout, axolotl).total / GIB == pytest.approx(64.5, rel=0.15)
    # Meta: Scout fits one H100 (80 GB) with int4 weights; its reference code serves fp8 on 2 and bf16 on 4
    # (llama-models' README). Here with an 8k KV cache.
    int4, int8, bf16 = (inference_estimate(scout, bits, 8192, 2).total for bits in (4, 8, 16))
    assert int4 <= 80 * GB < int8 <= 2 * 80 * GB < bf16 <= 4 * 80 * GB


def test_a_hub_id_plans_from_the_local_hugging_face_cache(tmp_path):
    revision = "0" * 40
    snapshot = tmp_path / "models--meta-llama--Llama-4-Scout-17B-16E-Instruct" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((SCOUT / "config.json").read_text(encoding="utf-8"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(revision)
    hub_id = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "llamatailor", "plan", "--model", hub_id, "--gpu-mem", "80", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["model"] == hub_id and plan["parameters"] == PRESETS["llama-4-scout"].total_params()


@pytest.mark.parametrize(
    ("hub_id", "preset"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b"),
        ("meta-llama/Meta-Llama-3-70B", "llama-3.1-70b"),
        ("meta-llama/llama-2-7b-chat-hf", "llama-2-7b"),
        ("meta-llama/Llama-3.3-70B-Instruct", "llama-3.3-70b"),
        ("meta-llama/Llama-4-Scout-17B-16E-Instruct", "llama-4-scout"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
    ],
)
def test_a_preset_releases_hub_id_plans_without_its_config(monkeypatch, tmp_path, hub_id, preset):
    """Before anything is downloaded (an empty Hugging Face cache), a release's hub id plans as its preset and
    says so; the cached config.json wins when there is one (test above)."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # an empty cache
    arch = load_architecture(hub_id)
    assert arch.name == f"{hub_id} (preset {preset})"
    assert arch.total_params() == PRESETS[preset].total_params() and arch.vocab == PRESETS[preset].vocab


def test_hub_releases_name_presets_and_a_near_miss_is_suggested(monkeypatch, tmp_path):
    assert set(HUB_RELEASES) <= set(PRESETS)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"did you mean 'meta-llama/Llama-3\.1-8B-Instruct'\?$"):
        load_architecture("meta-llama/Llama-3.1-8B-Instruc")
    with pytest.raises(ModelLoadError, match=r"release$"):
        load_architecture("someone/some-model")


def test_a_run_files_alias_is_planned_under_its_own_name():
    """The embedded alias resolves to a converted folder named after its GGUF file; the plan says the alias."""
    arch = base_architecture("smollm2-135m-instruct")
    assert (
        arch.name == "smollm2-135m-instruct"
        and arch.total_params() == PRESETS["smollm2-135m-instruct"].total_params()
    )


@pytest.mark.parametrize(
    ("model_type", "key", "value"),
    [
        ("mixtral", "num_local_experts", 8),
        ("qwen2_moe", "num_experts", 60),
        ("deepseek_v3", "n_routed_experts", 256),
    ],
)
def test_other_mixture_of_experts_layouts_are_refused(tmp_path, model_type, key, value):
    config = {**TINY_LLAMA4, "model_type": model_type, "num_hidden_layers": 2, key: value}
    if key != "num_local_experts":
        del config["num_local_experts"]
    with pytest.raises(ModelLoadError) as refused:
        from_config(model_type, config)
    assert f"model_type '{model_type}'" in str(refused.value)
    assert "supports only Llama 4's Mixture-of-Experts layout" in str(refused.value)
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["plan", "--model", str(tmp_path), "--gpu-mem", "80"])
    assert result.exit_code == 1 and "supports only Llama 4" in " ".join(result.output.split())


def test_experts_on_a_dense_model_are_refused_by_plan_and_train_alike(tmp_path):
    """`targets: experts` on a model without routed experts: `plan RUN.yaml` refuses it (it planned all-linear
    silently before), as `plan --lora-targets experts` and the train stage's check do, naming the key."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}), encoding="utf-8")
    run = RunConfig.model_validate(
        {
            "name": "dense",
            "output_dir": str(tmp_path),
            "model": {"base": str(tmp_path)},
            "data": {"train": ["x.jsonl"]},
            "train": {"lora": {"targets": "experts"}},
        }
    )
    with pytest.raises(ConfigError, match=r"train\.lora\.targets: experts .* llama-3\.1-8b has none"):
        setup_from_config(run, PRESETS["llama-3.1-8b"])
    with pytest.raises(
        ConfigError, match=r"train\.lora\.targets: experts .*model_type 'llama'.*no routed experts"
    ):
        check_run_model(run)
    config.write_text(json.dumps({"model_type": "mixtral", "num_local_experts": 8}), encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"model_type 'mixtral', num_local_experts: 8"):
        check_run_model(run.model_copy(update={"train": run.train.model_copy(update={"method": "full"})}))


def test_the_serving_table_names_the_precision_its_columns_hold():
    """On CPU the unquantized column is fp32 (the plan's precision there), and the title says so rather than
    "16 bits"."""
    result = runner.invoke(app, ["plan", "--model", "llama-3.1-8b"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    precision = resolve_precision("auto")  # fp32 on CPU
    assert (
        f"serving llama-3.1-8b: weights in int4, int8, {precision}, KV cache of 8,192 tokens ({precision})"
        in text
    )
    assert "16 bits" not in text
