"""The planner: its formulas against autograd and real models, published figures, and the CLI verdict."""

import json
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from helpers import alpaca_rows, prepared_run
from llamatailor.cli import app
from llamatailor.config import LoraSection, RunConfig, Schedule, load_config
from llamatailor.errors import ConfigError, StageError
from llamatailor.models.families import FAMILIES
from llamatailor.models.loading import load_tokenizer
from llamatailor.plan.architectures import PRESETS, from_config
from llamatailor.plan.memory import (
    GIB,
    Setup,
    estimate,
    largest_trainable,
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


def planned_with_targets(targets):
    config = RunConfig.model_validate({"name": "t", "data": {"train": ["a.jsonl"]}})
    config.train.lora = LoraSection.model_construct(targets=targets)  # past validation, as a stray name
    return setup_from_config(config, PRESETS["llama-3.1-8b"])


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
    planner = known_names(planned_with_targets, candidates)
    trainer = known_names(
        lambda name: lora_config(LoraSection.model_construct(targets=name), FAMILIES["llama3"]), candidates
    )
    assert schema == planner == trainer == {"attention", "mlp", "all-linear"}
    for preset, modules in {
        "attention": {"q_proj", "k_proj", "v_proj", "o_proj"},
        "mlp": {"gate_proj", "up_proj", "down_proj"},
        "all-linear": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    }.items():
        assert set(planned_with_targets(preset).lora_targets) == modules
        trained = lora_config(LoraSection(targets=preset), FAMILIES["llama3"]).target_modules
        assert set(trained) == modules


def test_an_unknown_lora_target_preset_is_refused_by_name():
    message = (
        "train.lora.targets: unknown LoRA target preset 'attn': expected one of attention, mlp, all-linear"
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
        "--lora-targets 'q_proj,attn': 'attn' is neither a preset (attention, mlp, all-linear) nor a linear "
        "layer the planner counts (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
    ) in " ".join(result.output.split())
    result = runner.invoke(
        app, ["plan", "--model", "llama-3.1-8b", "--lora-targets", "q_proj, v_proj", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["setup"]["lora_targets"] == ["q_proj", "v_proj"]
