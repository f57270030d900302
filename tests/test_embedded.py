"""Integration on the embedded SmolLM2-135M-Instruct: a few real LoRA steps do what they must."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from helpers import write_run_file
from llamatailor.config import load_config
from llamatailor.data.prepare import prepare
from llamatailor.models.loading import load_tokenizer, load_tuned_model
from llamatailor.models.source import CONVERTED_MARKER, embedded_gguf_path, resolve_source
from llamatailor.train.model_setup import trainable_model
from llamatailor.train.session import save_trained
from llamatailor.train.sft import build_trainer, tokenized_split

DEMO_DATA = Path(__file__).parent.parent / "examples" / "data" / "stdlib_signatures.jsonl"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedded")
    data = folder / "train.jsonl"
    with DEMO_DATA.open() as source:
        data.write_text("".join(itertools.islice(source, 16)))
    run_file = write_run_file(
        folder,
        "smollm2-135m-instruct",
        [data],
        data={"val_ratio": 0.0, "test_ratio": 0.0, "max_seq_len": 256},
        train={"max_steps": 4, "batch_size": 4, "learning_rate": 1e-3, "save_steps": 100},
    )
    config = load_config(run_file)
    prepare(config)
    return config


def test_few_steps_lower_the_loss_and_change_exactly_the_adapter(embedded_run):
    config = embedded_run
    chat = load_tokenizer(config.model)
    model = trainable_model(config, chat, "fp32")
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    samples = tokenized_split(config.run_dir, "train", chat, config.data.max_seq_len)
    batch = DataCollatorForLanguageModeling(pad_token_id=chat.tokenizer.pad_token_id)(
        [samples[i] for i in range(8)]
    )

    def batch_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch).loss.item()

    loss_before = batch_loss()
    trainer = build_trainer(config, chat, model, "fp32")
    trainer.train()
    loss_after = batch_loss()
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)

    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert len(trainable) == 30 * 7 * 2  # 30 layers x 7 linear layers x (A, B)
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"

    save_trained(trainer, chat, config.run_dir.adapter, {"base": config.model.base})
    ours = load_tuned_model(config.model, config.run_dir.adapter).eval()
    base = AutoModelForCausalLM.from_pretrained(resolve_source(config.model.base).location)
    plain = PeftModel.from_pretrained(base, config.run_dir.adapter).eval()
    with torch.no_grad():
        assert torch.equal(ours(**batch).logits, plain(**batch).logits)
        assert abs(ours(**batch).loss.item() - loss_after) < 1e-4


def test_gguf_file_converts_once_to_the_same_weights_as_the_alias():
    gguf = embedded_gguf_path("smollm2-135m-instruct")
    by_path, by_alias = resolve_source(str(gguf)), resolve_source("smollm2-135m-instruct")
    assert (by_path.kind, by_alias.kind) == ("gguf", "embedded")
    assert by_path.location == by_alias.location
    folder = Path(by_path.location)
    config = AutoConfig.from_pretrained(folder)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert json.loads((folder / CONVERTED_MARKER).read_text())["gguf"] == str(gguf.resolve())
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([[1, 504, 3300, 28, 2, 198, 9690, 30]])
    with torch.no_grad():
        assert torch.equal(converted(input_ids=ids).logits, direct(input_ids=ids).logits)
