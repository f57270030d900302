"""Model sources, chat families and tokenizer preparation."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llamatailor.config import ModelSection
from llamatailor.errors import ModelLoadError
from llamatailor.models.families import FAMILIES, LLAMA3_TEMPLATE
from llamatailor.models.loading import prepare_tokenizer
from llamatailor.models.source import resolve_source
from llamatailor.models.tiny import real_tokenizer


def test_local_folder_hub_id_and_bad_specs(tmp_path, tiny_models):
    local = resolve_source(str(tiny_models["llama3"]))
    assert (local.kind, local.location) == ("local", str(tiny_models["llama3"]))
    hub = resolve_source("meta-llama/Llama-3.2-1B-Instruct")
    assert (hub.kind, hub.location) == ("hub", "meta-llama/Llama-3.2-1B-Instruct")
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        resolve_source(str(tmp_path))
    with pytest.raises(
        ModelLoadError, match=r"not a known alias \(smollm2-135m-instruct\), an existing folder"
    ):
        resolve_source("./models/missing")
    with pytest.raises(ModelLoadError, match=r"GGUF file 'missing\.gguf' not found"):
        resolve_source("missing.gguf")


def test_hub_id_offline_fails_with_a_way_forward(tmp_path):
    """Up to the point of the download: the hub path is taken, and offline it says what to do instead."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"name: hub\noutput_dir: {tmp_path}\ndata:\n  train: [{data}]\n", encoding="utf-8")
    cli = Path(sys.executable).parent / "llamatailor"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [str(cli), "prepare", str(run_file), "model.base=meta-llama/Llama-3.2-1B-Instruct"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 1
    assert "could not load 'meta-llama/Llama-3.2-1B-Instruct' from the Hugging Face Hub" in result.stderr
    assert "point model.base at a local folder" in result.stderr and "HF_TOKEN" in result.stderr


@pytest.mark.parametrize(
    ("kind", "family"), [("chatml", "chatml"), ("llama3", "llama3"), ("llama2", "llama2")]
)
def test_family_detected_from_real_tokenizers(kind, family, request):
    chat = request.getfixturevalue(kind)
    assert chat.family.name == family
    stop_tokens = chat.tokenizer.convert_ids_to_tokens(chat.stop_ids)
    expected = {
        "chatml": ["<|im_end|>"],
        "llama3": ["<|eot_id|>", "<|end_of_text|>"],  # Llama 3.0 vocabulary: no <|eom_id|> yet
        "llama2": ["</s>"],
    }
    assert stop_tokens == expected[family]


def test_base_tokenizer_without_template_gets_its_familys_template():
    tokenizer = real_tokenizer("llama3")
    tokenizer.chat_template = None
    chat = prepare_tokenizer(tokenizer, ModelSection())
    assert chat.family.name == "llama3"
    assert chat.tokenizer.chat_template == LLAMA3_TEMPLATE
    assert "has none" in chat.template_origin
    assert chat.tokenizer.pad_token == "<|end_of_text|>"  # Llama 3.0 has no <|finetune_right_pad_id|>
    text = chat.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"


def test_template_file_and_family_override(tmp_path, tiny_models):
    template = tmp_path / "t.jinja"
    template.write_text(FAMILIES["chatml"].default_template, encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama3"])
    chat = prepare_tokenizer(tokenizer, ModelSection(chat_template=template, family="chatml"))
    assert chat.family.name == "chatml" and chat.template_origin == f"file {template}"
    with pytest.raises(ModelLoadError, match=r"model\.chat_template: cannot read"):
        prepare_tokenizer(tokenizer, ModelSection(chat_template=tmp_path / "missing.jinja"))


def test_tiny_models_match_their_tokenizers(tiny_models):
    from transformers import AutoConfig

    for folder in tiny_models.values():
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert config.vocab_size == len(tokenizer)
        assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (64, 2, 2)
