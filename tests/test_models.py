"""Model sources, chat families and tokenizer preparation."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from llamatailor.config import ModelSection
from llamatailor.errors import ModelLoadError
from llamatailor.models.families import FAMILIES, LLAMA3_TEMPLATE
from llamatailor.models.loading import prepare_tokenizer
from llamatailor.models.source import embedded_gguf_path, resolve_source
from tiny_models import TINY_LLAMA4_SHAPE, llama4_tokenizer, real_tokenizer


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


# --- A base that is not a model: refused before anything is converted or allocated ---


def write_gguf(target: Path, folder: Path, chat, weights: bool = True, replace=None) -> Path:
    """`folder` (a tiny Llama) as an F32 GGUF with its tokenizer, through the export stage's writers;
    `weights=False` writes the metadata only, `replace` swaps tensors by GGUF name."""
    import gguf
    from transformers import LlamaConfig

    from llamatailor.export.gguf_file import tensors, vocabulary, write_metadata, write_tokenizer
    from llamatailor.export.rope import gguf_rope

    config = LlamaConfig.from_pretrained(folder)
    rope = gguf_rope(config, str(folder))
    writer = gguf.GGUFWriter(target, "llama")
    write_metadata(writer, config, "tiny", gguf.LlamaFileType.ALL_F32, rope)
    write_tokenizer(writer, vocabulary(folder, chat, config.vocab_size), chat)
    for name, array in tensors(folder, config, rope) if weights else ():
        writer.add_tensor(name, (replace or {}).get(name, array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory, tiny_models, chatml):
    import numpy as np

    root, folder = tmp_path_factory.mktemp("ggufs"), tiny_models["chatml"]
    wrong = {"blk.1.ffn_up.weight": np.zeros((100, 64), dtype=np.float32)}
    return {
        "metadata": write_gguf(root / "metadata.gguf", folder, chatml, weights=False),
        "misshaped": write_gguf(root / "misshaped.gguf", folder, chatml, replace=wrong),
    }


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A cache of its own, so that a conversion (which the checks must prevent) would show."""
    monkeypatch.setenv("LLAMATAILOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# 2 layers x 9 tensors, the embedding and the final norm; the output matrix may be tied
TINY_GGUF = "the 20 tensors of a llama model with 2 layers, hidden size 64 and a 49,152-token vocabulary"


def test_metadata_only_gguf_refused_at_tokenizer_and_model_load(tiny_ggufs, empty_cache):
    from llamatailor.models.loading import load_base_model, load_tokenizer

    path = tiny_ggufs["metadata"]
    expected = (
        f"{path}: no weights: it holds no tensors at all (metadata or a vocabulary only); a base model needs "
        f"{TINY_GGUF}, as its metadata declares, e.g. token_embd.weight (49152, 64)"
    )
    for load in (load_tokenizer, load_base_model):  # prepare loads only the tokenizer
        with pytest.raises(ModelLoadError) as refused:
            load(ModelSection(base=str(path)))
        assert str(refused.value) == expected
    assert not (empty_cache / "models").exists()  # nothing converted


def test_vocabulary_only_gguf_refused_fast_without_allocating(tmp_path, monkeypatch):
    import resource
    import time

    from llamatailor.models.loading import load_tokenizer
    from tiny_models import llama_cpp_model_file

    path = llama_cpp_model_file("ggml-vocab-llama-bpe.gguf")  # Llama 3's vocabulary, and no tensor
    monkeypatch.setenv("LLAMATAILOR_CACHE", str(tmp_path))  # after finding the file in the shared cache
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as refused:
        load_tokenizer(ModelSection(base=str(path)))
    elapsed = time.perf_counter() - start
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert elapsed < 2.0 and peak_growth < 1 << 20  # the 8B it declares would be 32 GB in fp32
    message = str(refused.value)
    assert message.startswith(f"{path}: no weights: it holds no tensors at all")
    assert "the 290 tensors of a llama model with 32 layers, hidden size 4096 and a 128,256-token" in message
    assert message.endswith("e.g. token_embd.weight (128256, 4096)")
    assert not (tmp_path / "models").exists()


def test_gguf_with_a_misshaped_or_cut_tensor_is_refused_by_name(tiny_ggufs, empty_cache, tmp_path):
    from llamatailor.models.base_check import check_gguf

    path = tiny_ggufs["misshaped"]
    with pytest.raises(ModelLoadError) as refused:
        resolve_source(str(path))
    assert str(refused.value) == (
        f"{path}: not a whole model: 1 weight of the wrong shape (blk.1.ffn_up.weight is (100, 64) where "
        f"(128, 64) was expected); expected {TINY_GGUF}, as its metadata declares"
    )
    embedded = embedded_gguf_path("smollm2-135m-instruct")
    check_gguf(embedded)  # whole, it passes
    cut = tmp_path / "cut.gguf"
    shutil.copyfile(embedded, cut)
    os.truncate(cut, embedded.stat().st_size - 4096)  # as an interrupted download leaves it
    with pytest.raises(ModelLoadError) as refused:
        check_gguf(cut)
    assert re.fullmatch(
        rf"{cut}: cut short: tensor \S+'s data runs to byte [\d,]+ but the file ends at byte "
        rf"{cut.stat().st_size:,} \(an interrupted download or copy\?\)",
        str(refused.value),
    )
    assert not (empty_cache / "models").exists()


def copy_model_folder(source: Path, target: Path, shards: int = 1, replace=None) -> Path:
    """`source`'s config and tokenizer files, and its weights split into `shards` safetensors files with
    an index (as save_pretrained shards a large model); `replace` swaps tensors by name."""
    import json

    from safetensors.torch import load_file, save_file

    target.mkdir()
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, target / file.name)
    weights = load_file(source / "model.safetensors") | (replace or {})
    names = sorted(weights)
    if shards == 1:
        save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
        return target
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: weights[name] for name in names[shard::shards]}
        save_file(part, target / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    return target


def test_hf_folder_without_weights_or_with_missing_shard_refused_at_tokenizer_load(tmp_path, tiny_models):
    from llamatailor.models.loading import load_tokenizer

    bare = copy_model_folder(tiny_models["chatml"], tmp_path / "bare")
    (bare / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as refused:
        load_tokenizer(ModelSection(base=str(bare)))
    assert str(refused.value).startswith(f"{bare}: no weights: config.json but no model.safetensors, ")
    sharded = copy_model_folder(tiny_models["chatml"], tmp_path / "sharded", shards=3)
    load_tokenizer(ModelSection(base=str(sharded)))  # whole, it loads
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelLoadError) as refused:
        load_tokenizer(ModelSection(base=str(sharded)))
    assert str(refused.value) == (
        f"{sharded / 'model.safetensors.index.json'}: 1 of its 3 shards are missing: "
        "model-00002-of-00003.safetensors; expected every file the index's weight_map names"
    )


def test_hf_folder_with_misshaped_or_missing_tensors_named(tmp_path, tiny_models):
    import torch

    wrong = {"model.layers.1.mlp.up_proj.weight": torch.zeros(100, 64)}
    folder = copy_model_folder(tiny_models["chatml"], tmp_path / "wrong", shards=2, replace=wrong)
    with pytest.raises(ModelLoadError) as refused:
        resolve_source(str(folder))
    assert str(refused.value) == (
        f"{folder}: not a whole model: 1 weight of the wrong shape (model.layers.1.mlp.up_proj.weight is "
        "(100, 64) where (128, 64) was expected); expected the 21 tensors of a LlamaForCausalLM with 2 layers "
        "and hidden size 64, as its config.json declares"
    )
    from safetensors.torch import load_file, save_file

    legacy = copy_model_folder(tiny_models["chatml"], tmp_path / "legacy", replace=wrong)
    torch.save(load_file(legacy / "model.safetensors"), legacy / "pytorch_model.bin")
    (legacy / "model.safetensors").unlink()  # a .bin checkpoint's shapes are read too
    with pytest.raises(ModelLoadError, match=r"up_proj\.weight is \(100, 64\) where \(128, 64\) was"):
        resolve_source(str(legacy))
    headless = copy_model_folder(tiny_models["chatml"], tmp_path / "headless")

    weights = load_file(headless / "model.safetensors")
    del weights["lm_head.weight"], weights["model.norm.weight"]
    save_file(weights, headless / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ModelLoadError,
        match=r"2 of its 21 weights are missing \(model\.norm\.weight, lm_head\.weight\); expected",
    ):
        resolve_source(str(headless))


def test_bare_checkpoint_without_lm_head_refused_after_load(tmp_path):
    """A checkpoint saved from the bare LlamaModel is not compared name by name (its keys are renamed on
    load), so transformers' load report is the check: its lm_head would be random."""
    from transformers import LlamaConfig, LlamaModel

    from llamatailor.models.loading import load_base_model
    from tiny_models import TINY_SHAPE

    LlamaModel(LlamaConfig(vocab_size=256, tie_word_embeddings=False, **TINY_SHAPE)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as refused:
        load_base_model(ModelSection(base=str(tmp_path)))
    assert str(refused.value) == (
        f"model.base '{tmp_path}': not a whole model: 1 weight the model needs is not in its files "
        "(lm_head.weight); transformers would initialize it at random"
    )


def test_gguf_cut_inside_its_header_is_refused_by_name(tmp_path, empty_cache):
    """An interrupted download that ends before the tensor table does (here at 30, 100, 200 and 400 bytes,
    and halfway through the header) is refused naming the file, not with struct's raw error."""
    from llamatailor.models.base_check import _gguf_table, check_gguf

    embedded = embedded_gguf_path("smollm2-135m-instruct")
    header_bytes = _gguf_table(embedded)[2]
    with embedded.open("rb") as handle:
        whole = handle.read(header_bytes)
    for size in (30, 100, 200, 400, header_bytes // 2):
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(whole[:size])
        with pytest.raises(ModelLoadError) as refused:
            resolve_source(str(cut))
        assert str(refused.value) == (
            f"{cut}: cut short: the file ends at byte {size:,}, inside its header (metadata and tensor "
            "table), so it is not a whole GGUF file (an interrupted download or copy?)"
        )
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError) as refused:
        check_gguf(empty)
    assert (
        str(refused.value)
        == f"{empty}: the file is empty (0 bytes), not a GGUF model (an interrupted download?)"
    )
    assert not (empty_cache / "models").exists()


def test_llama4_family_from_its_template_and_from_its_vocabulary():
    """Llama 4's format is told from its template, or for a base without one from its special tokens; it stops
    on <|eot|> (end of turn), <|eom|> (end of a tool-call message) and <|end_of_text|>."""
    chat = prepare_tokenizer(llama4_tokenizer(), ModelSection())
    assert chat.family.name == "llama4" and chat.template_origin == "tokenizer"
    assert chat.tokenizer.convert_ids_to_tokens(chat.stop_ids) == ["<|eot|>", "<|eom|>", "<|end_of_text|>"]
    base = llama4_tokenizer()
    base.chat_template = None
    chat = prepare_tokenizer(base, ModelSection())
    assert chat.family.name == "llama4" and "has none" in chat.template_origin
    text = chat.tokenizer.apply_chat_template(
        [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "ok"}], tokenize=False
    )
    assert text == (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nhi<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nok<|eot|>"
    )
    assert chat.tokenizer.pad_token == "<|finetune_right_pad|>"


def test_llama4_multimodal_checkpoint_loads_as_its_text_model(tmp_path):
    """Meta's Llama 4 releases are Llama4ForConditionalGeneration checkpoints (text + vision), whose config.json
    transformers 5.23 refuses as written: a run loads their tokenizer and text model (the vision tower is not
    tuned, merged or exported) with every text weight and the same logits."""
    from transformers import (
        Llama4Config,
        Llama4ForConditionalGeneration,
        Llama4TextConfig,
        Llama4VisionConfig,
    )

    from llamatailor.models.loading import load_base_model, load_tokenizer

    text = Llama4TextConfig(vocab_size=512, **TINY_LLAMA4_SHAPE)
    vision = Llama4VisionConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vision_output_dim=64,
        projector_input_dim=64,
        projector_output_dim=64,
        image_size=28,
        patch_size=14,
    )
    torch.manual_seed(0)
    full = Llama4ForConditionalGeneration(
        Llama4Config(text_config=text.to_dict(), vision_config=vision.to_dict())
    )
    folder = tmp_path / "scout-like"
    full.save_pretrained(folder)
    real_tokenizer("llama3").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["text_config"]["attn_temperature_tuning"] = 4  # as Meta writes it; transformers declares a bool
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert load_tokenizer(ModelSection(base=str(folder))).tokenizer.bos_token == "<|begin_of_text|>"
    loaded = load_base_model(ModelSection(base=str(folder)))
    assert type(loaded).__name__ == "Llama4ForCausalLM" and loaded.config.attn_temperature_tuning is True
    ids = torch.tensor([[1, 7, 42, 300, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, full(input_ids=ids).logits)
