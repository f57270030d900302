"""LoRA GGUF export: the adapter's tensors and metadata read back, llama.cpp's base GGUF + adapter against the
PEFT adapter model (logits and greedy answers), rsLoRA's alpha, refusals, and the export stage's files."""

import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from helpers import conversation, prepared_run
from llamatailor.cli import app
from llamatailor.config import ModelSection, load_config
from llamatailor.data.templating import render_for_training
from llamatailor.errors import CheckFailed
from llamatailor.export.gguf_file import permute_rotary, write_gguf
from llamatailor.export.gguf_lora import check_lora, lora_gguf_paths, write_lora_gguf
from llamatailor.export.merge import Probe
from llamatailor.export.stage import STAGE
from llamatailor.generation.prompts import TokenizerPrompter
from llamatailor.models.loading import load_saved_tokenizer, load_tokenizer
from tiny_models import build_tiny_llama4

runner = CliRunner()
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
HEADS, KV_HEADS, LAYERS = 4, 2, 2  # the tiny Llama's


def save_adapter(base: Path, folder: Path, targets: list[str] | None = None, **options) -> Path:
    """A PEFT adapter on `base` (r 8, alpha 16) with random lora_B (PEFT starts B at zero, which would
    change nothing), saved by PEFT itself into `folder`."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets or LINEARS, **options))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    peft.save_pretrained(folder)
    return folder


def adapter_model(base: Path, adapter: Path) -> PeftModel:
    return PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    ).eval()


def probe_for(chat) -> Probe:
    """Three chat conversations rendered as for training, and their prompts."""
    conversations = [
        [
            {"role": "user", "content": f"Question {n}: what is {n} + {n}?"},
            {"role": "assistant", "content": f"It is {2 * n}, I think."},
        ]
        for n in range(3)
    ]
    samples = [render_for_training(chat, messages, 128, None) for messages in conversations]
    prompter = TokenizerPrompter(chat)
    return Probe(
        [s.input_ids for s in samples],
        [s.labels for s in samples],
        [prompter.chat_ids(messages[:-1]) for messages in conversations],
    )


@pytest.fixture(scope="module")
def lora_files(tiny_models, chatml, tmp_path_factory):
    """The tiny ChatML Llama as f32 and f16 base GGUFs, and a LoRA on every linear layer and lm_head."""
    folder, base = tmp_path_factory.mktemp("lora"), tiny_models["chatml"]
    adapter = save_adapter(base, folder / "adapter", [*LINEARS, "lm_head"])
    files = {t: write_gguf(base, folder / f"base-{t}.gguf", t, chatml, "base") for t in ("f32", "f16")}
    return base, adapter, files, write_lora_gguf(adapter, base, folder / "lora.gguf")


def test_tensors_and_metadata_read_back(lora_files, tmp_path):
    base, adapter, _, path = lora_files
    config = AutoConfig.from_pretrained(base)  # the base's config alone writes the same file
    assert write_lora_gguf(adapter, config, tmp_path / "c.gguf").read_bytes() == path.read_bytes()
    config.tie_word_embeddings = True
    with pytest.raises(
        CheckFailed, match=r"lm_head of a model with tied embeddings: the base GGUF has no output"
    ):
        write_lora_gguf(adapter, config, tmp_path / "tied.gguf")
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert field("general.architecture") == "llama" and field("adapter.lora.alpha") == 16.0
    tensors = {t.name: t for t in reader.tensors}
    expected = {f"blk.{i}.{b}.weight.lora_{f}" for i in range(LAYERS) for b in BLOCK for f in "ab"}
    assert set(tensors) == expected | {"output.weight.lora_a", "output.weight.lora_b"}
    assert {t.tensor_type for t in tensors.values()} == {gguf.GGMLQuantizationType.F32}
    factors = {
        key.removeprefix("base_model.model.").removesuffix(".weight"): value.numpy()
        for key, value in load_file(adapter / "adapter_model.safetensors").items()
    }
    data = lambda name: np.asarray(tensors[name].data)  # noqa: E731  numpy order: (r, in), (out, r)
    layer = "model.layers.1.self_attn"
    assert data("blk.1.attn_q.weight.lora_a").shape == (8, 64)
    np.testing.assert_array_equal(data("blk.1.attn_q.weight.lora_a"), factors[f"{layer}.q_proj.lora_A"])
    # lora_b's rows of Q and K permuted as the base's Q and K weights are; V's as they are
    q_b, k_b = factors[f"{layer}.q_proj.lora_B"], factors[f"{layer}.k_proj.lora_B"]
    np.testing.assert_array_equal(data("blk.1.attn_q.weight.lora_b"), permute_rotary(q_b, HEADS))
    np.testing.assert_array_equal(data("blk.1.attn_k.weight.lora_b"), permute_rotary(k_b, KV_HEADS))
    assert data("blk.1.attn_k.weight.lora_b").shape == (32, 8) and not np.array_equal(
        permute_rotary(k_b, 2), k_b
    )
    np.testing.assert_array_equal(data("blk.1.attn_v.weight.lora_b"), factors[f"{layer}.v_proj.lora_B"])
    assert data("output.weight.lora_b").shape == (len(factors["lm_head.lora_B"]), 8)


@pytest.mark.parametrize("base_type", ["f32", "f16"])
def test_base_gguf_with_the_adapter_equals_the_adapter_model(lora_files, chatml, base_type):
    base, adapter, files, path = lora_files
    result = check_lora(adapter_model(base, adapter), chatml, files[base_type], path, probe_for(chatml), 1e-3)
    assert result.failures == [] and result.greedy_identical == result.greedy_compared == 3
    # measured 2026-11-30: f32 base 4.8e-7 (yardstick 3.6e-7), f16 base 6.0e-4 (yardstick 4.9e-4) with
    # tolerance 2.9e-3; the adapter moves logits by 0.8, so a wrong layout or scale cannot pass
    bound = 2e-6 if base_type == "f32" else 1.5e-3
    assert result.max_abs_logit_diff < bound and result.max_abs_logit_diff < result.tolerance
    assert result.adapter_max_abs_logit_diff > 0.5 > 100 * result.tolerance
    saved = load_file(adapter / "adapter_model.safetensors")  # with lm_head's own weight (PEFT saves it)
    lora_numbers = sum(t.numel() for key, t in saved.items() if ".lora_" in key)
    assert result.adapter_size_mb == pytest.approx(4 * lora_numbers / 2**20, abs=0.02)  # F32


def test_rslora_alpha_makes_llama_cpps_scale_equal_peft(tiny_models, chatml, lora_files, tmp_path):
    """rsLoRA scales by alpha / sqrt(r); llama.cpp by alpha / r: alpha 16 is written as 16 · sqrt(8), and
    o_proj at rank 4 (rank_pattern) gets sqrt(4 / 8) in its lora_b. Written as llama.cpp's own converter
    writes it (alpha as is), the check fails."""
    base, _, files, _ = lora_files
    adapter = save_adapter(base, tmp_path / "rs", use_rslora=True, rank_pattern={"o_proj": 4})
    path = write_lora_gguf(adapter, base, tmp_path / "rs.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.get_field("adapter.lora.alpha").contents() == pytest.approx(16 * math.sqrt(8), rel=1e-6)
    o_b = next(t for t in reader.tensors if t.name == "blk.0.attn_output.weight.lora_b")
    saved = load_file(adapter / "adapter_model.safetensors")
    stored = saved["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"].numpy()
    assert o_b.data.shape == (64, 4)
    np.testing.assert_allclose(np.asarray(o_b.data), stored * math.sqrt(4 / 8), rtol=1e-6)
    model, probe = adapter_model(base, adapter), probe_for(chatml)
    result = check_lora(model, chatml, files["f32"], path, probe, 1e-3)
    assert result.failures == [] and result.max_abs_logit_diff < 2e-6, result
    plain = tmp_path / "as-llama-cpp-writes-it"
    shutil.copytree(adapter, plain)
    lora = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**lora, "use_rslora": False}))
    wrong = check_lora(
        model, chatml, files["f32"], write_lora_gguf(plain, base, tmp_path / "plain.gguf"), probe, 1e-3
    )
    assert wrong.max_abs_logit_diff > 0.1 and "differs from the adapter model by" in wrong.failures[0]


def test_an_adapter_that_changes_nothing_fails_the_check(lora_files, chatml, tmp_path):
    base, _, files, _ = lora_files
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=LINEARS)
    )
    model.save_pretrained(tmp_path / "zero")  # PEFT's own initialisation: B = 0
    path = write_lora_gguf(tmp_path / "zero", base, tmp_path / "zero.gguf")
    result = check_lora(model.eval(), chatml, files["f32"], path, probe_for(chatml), 1e-3)
    assert result.adapter_max_abs_logit_diff == 0.0
    assert [f for f in result.failures if "it was not applied, or it does nothing" in f]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"use_dora": True}, r"use_dora is set: DoRA .*lora_magnitude_vector"),
        ({"modules_to_save": ["embed_tokens"]}, r"modules_to_save is set.*embed_tokens"),
        ({"lora_bias": True}, r"lora_bias is set: llama.cpp's LoRA has no bias"),
    ],
)
def test_what_llama_cpp_cannot_represent_is_refused(lora_files, tmp_path, options, named):
    base = lora_files[0]
    adapter = save_adapter(base, tmp_path / "adapter", **options)
    with pytest.raises(CheckFailed, match=named):
        write_lora_gguf(adapter, base, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_llama4_attention_and_shared_expert_converted_experts_refused(tmp_path_factory, tmp_path):
    """Llama 4's attention, dense MLP and shared expert (llama4 architecture, no Q/K permutation) convert;
    its routed experts (PEFT target_parameters) are refused."""
    base = build_tiny_llama4(tmp_path_factory.mktemp("llama4") / "model")
    chat = load_tokenizer(ModelSection(base=str(base)))
    adapter = save_adapter(base, tmp_path / "attention")
    path = write_lora_gguf(adapter, base, tmp_path / "l4.gguf")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "blk.1.ffn_up_shexp.weight.lora_b" in names and "blk.0.ffn_up.weight.lora_b" in names
    result = check_lora(
        adapter_model(base, adapter),
        chat,
        write_gguf(base, tmp_path / "b.gguf", "f32", chat, "b"),
        path,
        probe_for(chat),
        1e-3,
    )
    assert (
        result.failures == [] and result.max_abs_logit_diff < 2e-6 < 0.5 < result.adapter_max_abs_logit_diff
    )
    experts = save_adapter(
        base, tmp_path / "experts", ["q_proj"], target_parameters=["feed_forward.experts.down_proj"]
    )
    with pytest.raises(CheckFailed, match=r"target_parameters is set: LoRA on fused parameters"):
        write_lora_gguf(experts, base, tmp_path / "e.gguf")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_models):
    """A tiny ChatML run taught to answer "ok", exported to f16 with export.lora_gguf."""
    folder = tmp_path_factory.mktemp("export-lora")
    rows = [conversation(f"Question number {n}?", "ok") for n in range(40)]
    run_file = prepared_run(
        folder,
        tiny_models["chatml"],
        rows,
        train={"max_steps": 30, "learning_rate": 1e-2, "batch_size": 8, "save_steps": 100},
        eval={"max_new_tokens": 8, "json_fields": None},
        export={"gguf": ["f16"], "lora_gguf": True},
    )
    for verb in ("train", "merge", "export"):
        result = runner.invoke(app, [verb, str(run_file)])
        assert result.exit_code == 0, result.output
    return run_file


def test_export_stage_writes_and_checks_the_lora_files(exported):
    config = load_config(exported)
    base, adapter = lora_gguf_paths(config)
    assert (base.name, adapter.name) == ("tiny-base-f16.gguf", "tiny-lora.gguf")
    assert {base, adapter} <= set(STAGE.outputs(config)) and base.is_file() and adapter.is_file()
    report = json.loads((config.run_dir.gguf / "export_report.json").read_text())
    lora = report["lora"]
    assert report["failures"] == [] == lora["failures"] and lora["adapter"] == str(adapter)
    assert lora["max_abs_logit_diff"] < lora["tolerance"] < 0.01 < lora["adapter_max_abs_logit_diff"]
    assert lora["greedy_identical"] == lora["greedy_compared"] > 0 and lora["alpha"] == 8.0
    file_check = lora["file_check"]
    assert file_check["path"] == str(base) and file_check["gate_pct"] == 1.1
    assert file_check["chat_finish_reason"] == "stop" and file_check["chat_answer"] == "ok"
    assert file_check["tokenizer_mismatches"] == 0 and file_check["top1_agreement"] > 0.99
    chat = load_saved_tokenizer(config.run_dir.merged, config.model)
    reader = gguf.GGUFReader(base)
    assert reader.get_field("tokenizer.chat_template").contents() == chat.tokenizer.chat_template


def test_a_failed_lora_check_fails_the_stage_after_the_report(exported, tmp_path):
    """The run's adapter with its lora_B zeroed changes nothing: the stage fails, naming the file."""
    source = load_config(exported)
    shutil.copytree(source.run_dir.root.parent.parent, tmp_path / "copy")
    run_file = tmp_path / "copy" / "run.yaml"
    text = run_file.read_text().replace(str(source.output_dir), str(tmp_path / "copy" / "runs"))
    run_file.write_text(text)
    weights = load_config(run_file).run_dir.adapter / "adapter_model.safetensors"
    save_file({k: v * 0 if ".lora_B." in k else v for k, v in load_file(weights).items()}, weights)
    result = runner.invoke(app, ["export", str(run_file)])
    assert result.exit_code != 0
    assert "tiny-lora.gguf: the adapter moves llama.cpp's logits by only 0.00e+00" in result.output
    report = json.loads((load_config(run_file).run_dir.gguf / "export_report.json").read_text())
    assert report["lora"]["adapter_max_abs_logit_diff"] == 0.0 and report["failures"]


def test_serve_chooses_the_lora_gguf_by_model(exported, tiny_models, tmp_path):
    """`serve RUN --adapter second=FILE.gguf`: llama-server over the run's base GGUF with the run's LoRA and a
    second one; `model` chooses: the run's answers "ok" as trained, `base` is the base GGUF alone, `second`
    equals llama.cpp in this process with that adapter attached (same prompt ids, greedy)."""
    from helpers import Server
    from llamatailor.export.gguf_lora import attach_lora
    from llamatailor.generation.answers import answer_all
    from llamatailor.generation.engines import LlamaCppEngine

    config = load_config(exported)
    base_gguf, _ = lora_gguf_paths(config)
    second = write_lora_gguf(
        save_adapter(tiny_models["chatml"], tmp_path / "second", LINEARS),
        tiny_models["chatml"],
        tmp_path / "s.gguf",
    )
    chat = load_saved_tokenizer(config.run_dir.merged, config.model)
    question = [{"role": "user", "content": "Question number 3?"}]
    prompt = TokenizerPrompter(chat, config.data.system_prompt).chat_ids(question)
    running = Server(exported, "--adapter", f"second={second}", log=tmp_path / "server.log")
    try:
        client = running.client(key=None)
        assert [m.id for m in client.models.list().data] == ["base", "tiny", "second"]
        answers = {}
        for model in ("tiny", "base", "second", "tiny"):
            reply = client.chat.completions.create(
                model=model, messages=question, max_tokens=8, temperature=0
            )
            answers.setdefault(model, []).append(reply.choices[0].message.content)
    finally:
        running.stop()
    expected = {}
    for name, adapter in (("base", None), ("second", second)):
        engine = LlamaCppEngine(name, base_gguf, 256, 1)
        if adapter is not None:
            attach_lora(engine.llm, adapter)
        expected[name] = answer_all(engine, TokenizerPrompter(chat, config.data.system_prompt), [prompt], 8)[
            0
        ].text
    assert answers["tiny"] == ["ok", "ok"]  # the run's adapter, also after the others were used
    assert [a.strip() for a in answers["base"]] == [expected["base"]] and answers["base"] != ["ok"]
    assert [a.strip() for a in answers["second"]] == [expected["second"]] != [expected["base"]]
