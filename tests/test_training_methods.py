"""Each training method changes exactly the weights it should; QLoRA's base is 4-bit; options take effect."""

import bitsandbytes as bnb
import pytest
import torch
from transformers import set_seed

from helpers import alpaca_rows, prepared_run
from llamatailor.config import load_config
from llamatailor.errors import StageError
from llamatailor.models.loading import load_tokenizer
from llamatailor.train.model_setup import trainable_model
from llamatailor.train.sft import build_trainer


def snapshot(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def train_briefly(tmp_path, tiny_models, **train):
    run_file = prepared_run(
        tmp_path,
        tiny_models["chatml"],
        alpaca_rows(16),
        train={"max_steps": 3, "save_steps": 100, "learning_rate": 1e-2, **train},
    )
    config = load_config(run_file)
    chat = load_tokenizer(config.model)
    model = trainable_model(config, chat, "fp32")
    before = snapshot(model)
    build_trainer(config, chat, model, "fp32").train()
    return model, before


@pytest.mark.parametrize(
    ("train", "trainable_marker"),
    [
        ({"method": "lora"}, ".lora_"),
        ({"method": "lora", "lora": {"r": 4, "alpha": 8, "dora": True}}, ".lora_"),
        ({"method": "qlora"}, ".lora_"),
        ({"method": "full"}, ""),
    ],
    ids=["lora", "dora", "qlora", "full"],
)
def test_method_trains_exactly_its_weights(tmp_path, tiny_models, train, trainable_marker):
    model, before = train_briefly(tmp_path, tiny_models, **train)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(trainable_marker in name for name in trainable)
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    if train["method"] == "full":
        assert len(trainable) == len(before)
    if train.get("lora", {}).get("dora"):
        assert any("lora_magnitude_vector" in name for name in trainable)


def test_qlora_base_layers_are_4bit_and_stay_so(tmp_path, tiny_models):
    model, _ = train_briefly(tmp_path, tiny_models, method="qlora")
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # 2 layers x 7 linear layers
    for layer in quantized:
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.quant_type == "nf4"
        assert layer.weight.quant_state.nested, "double quantization"
    eight_bit, _ = train_briefly(tmp_path / "8", tiny_models, method="qlora", quantization={"bits": 8})
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in eight_bit.modules())


def test_target_presets_and_rslora_scaling(tmp_path, tiny_models):
    run_file = prepared_run(
        tmp_path,
        tiny_models["chatml"],
        alpaca_rows(8),
        train={"lora": {"r": 4, "alpha": 8, "targets": "attention", "rslora": True}},
    )
    config = load_config(run_file)
    model = trainable_model(config, load_tokenizer(config.model), "fp32")
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / 4**0.5)


def test_schedule_options_reach_the_optimiser(tmp_path, tiny_models):
    run_file = prepared_run(
        tmp_path,
        tiny_models["chatml"],
        alpaca_rows(16),
        train={
            "max_steps": 6,
            "lr_scheduler": "linear",
            "warmup_ratio": 0.5,
            "learning_rate": 1e-3,
            "grad_accum": 2,
        },
    )
    config = load_config(run_file)
    chat = load_tokenizer(config.model)
    trainer = build_trainer(config, chat, trainable_model(config, chat, "fp32"), "fp32")
    trainer.train()
    lrs = [row["learning_rate"] for row in trainer.state.log_history if "learning_rate" in row]
    # linear warm-up over 3 steps to 1e-3, then linear decay to 0 at step 6
    assert lrs == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3, 2e-3 / 3, 1e-3 / 3])
    assert trainer.args.gradient_accumulation_steps == 2 and trainer.args.optim == "adamw_torch"


def test_gpu_only_options_are_refused_on_cpu(tmp_path, tiny_models, monkeypatch):
    run_file = prepared_run(
        tmp_path, tiny_models["chatml"], alpaca_rows(8), train={"optimizer": "paged_adamw_8bit"}
    )
    config = load_config(run_file)
    chat = load_tokenizer(config.model)
    with pytest.raises(
        StageError, match=r"train\.optimizer paged_adamw_8bit needs a CUDA GPU; use adamw on CPU"
    ):
        build_trainer(config, chat, trainable_model(config, chat, "fp32"), "fp32")
    from llamatailor.train.launch import check_launch

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(
        StageError, match="FSDP needs CUDA GPUs; on CPU it would silently run as plain data parallelism"
    ):
        check_launch()


@pytest.mark.parametrize("option", ["gradient_checkpointing", "packing"])
def test_memory_and_padding_options_give_the_same_losses(tmp_path, tiny_models, option):
    """Recomputed activations, and rows joined without padding, train the same model."""
    losses = []
    for on in (False, True):
        folder = tmp_path / str(on)
        run_file = prepared_run(
            folder, tiny_models["chatml"], alpaca_rows(16), train={"max_steps": 3, option: on}
        )
        config = load_config(run_file)
        chat = load_tokenizer(config.model)
        # The LoRA initialisation, as `train_sft` seeds it: unseeded, it came from whatever the process had
        # drawn before, so the two runs started from different adapters (1.6e-3 apart by step 3 under -n 2).
        set_seed(config.seed)
        trainer = build_trainer(config, chat, trainable_model(config, chat, "fp32"), "fp32")
        assert (trainer.args.activation_checkpointing, trainer.packing) == (
            on and option == "gradient_checkpointing",
            on and option == "packing",
        )
        trainer.train()
        losses.append([row["loss"] for row in trainer.state.log_history if "loss" in row])
    # From the same adapter both give bitwise the same losses here; the slack is for float sums that another
    # CPU's kernels may reorder.
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
