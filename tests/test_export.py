"""merge and export: merge equality, GGUF metadata and tensors, llama.cpp's tokenizer and logits against
the HF model, stop behaviour, gates that fail on a broken file, and the Ollama Modelfile."""

import json

import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from helpers import conversation, prepared_run
from llamatailor.cli import app
from llamatailor.config import ModelSection, load_config
from llamatailor.errors import CheckFailed
from llamatailor.export.gguf_check import FileCheck, check_logits, check_tokenizer, logit_reference
from llamatailor.export.gguf_file import permute_rotary, write_gguf
from llamatailor.export.gguf_gates import DEFAULT_GATES_PCT
from llamatailor.export.gotemplate import TemplateError, render
from llamatailor.export.ollama import SAMPLE_CONVERSATIONS, build_modelfile, go_variables, hf_text
from llamatailor.generation.engines import LlamaCppEngine
from llamatailor.models.loading import load_base_model, load_saved_tokenizer
from tiny_models import build_tiny_model

runner = CliRunner()
SYSTEM_PROMPT = "You answer every question."
CONVERSATIONS = [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What's 12 + 30? Say it twice:\n  forty-two, déjà vu 😀"},
        {"role": "assistant", "content": '{"answer": 42, "note": "tab\\tand spaces  "}'},
    ],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"}],
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_models):
    """A tiny ChatML model taught to answer "ok" and stop, with a system prompt, merged and exported to f16,
    q8_0 and q4_k_m."""
    folder = tmp_path_factory.mktemp("export")
    rows = [conversation(f"Question number {n}?", "ok") for n in range(40)]
    run_file = prepared_run(
        folder,
        tiny_models["chatml"],
        rows,
        train={"max_steps": 30, "learning_rate": 1e-2, "batch_size": 8, "save_steps": 100},
        data={"system_prompt": SYSTEM_PROMPT},
        eval={"max_new_tokens": 8, "json_fields": None},
        export={"gguf": ["f16", "q8_0", "q4_k_m"]},
    )
    for verb in ("train", "merge", "export"):
        result = runner.invoke(app, [verb, str(run_file)])
        assert result.exit_code == 0, result.output
    return load_config(run_file), result.output


def test_merged_model_equals_the_adapter_model(exported, tiny_models):
    config, _ = exported
    run = config.run_dir
    report = json.loads((run.merged / "merge_report.json").read_text())
    assert report["max_abs_logit_diff"] < 1e-3
    assert report["saved_max_abs_logit_diff"] < 1e-3
    assert report["greedy_identical"] == report["greedy_compared"] > 0
    # Independently of the stage's own check: plain transformers and plain peft agree on fresh input.
    merged = AutoModelForCausalLM.from_pretrained(run.merged).eval()
    adapter = PeftModel.from_pretrained(load_base_model(config.model), run.adapter).eval()
    ids = torch.tensor([[1, 9, 25, 301, 4000, 17, 2]])
    with torch.inference_mode():
        assert torch.allclose(merged(ids).logits, adapter(ids).logits, atol=1e-4)
        with adapter.disable_adapter():
            base_logits = adapter(ids).logits
        # the adapter really changed the model, so the equality above says something
        assert (merged(ids).logits - base_logits).abs().max() > 1e-2
    chat = load_saved_tokenizer(run.merged, config.model)
    assert (
        merged.generation_config.eos_token_id
        == chat.stop_ids
        == [chat.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    )
    assert (
        chat.tokenizer.chat_template
        == load_saved_tokenizer(run.adapter, config.model).tokenizer.chat_template
    )


def test_merge_refuses_when_the_merged_model_differs(exported):
    from llamatailor.export.merge import MergeResult, check_merge

    config, _ = exported
    broken = MergeResult(config.run_dir.merged, "x", "float32", 3e-2, 3e-2, 0.0, 7, 8, 1e-3)
    with pytest.raises(
        CheckFailed, match=r"3\.00e-02 exceeds export.merge_tolerance 1e-03.*differ on 1 of 8"
    ):
        check_merge(broken)


def test_gguf_metadata_and_tensors_read_back(exported):
    config, _ = exported
    run = config.run_dir
    chat = load_saved_tokenizer(run.merged, config.model)
    reader = gguf.GGUFReader(run.gguf_file("tiny", "f16"))
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("tokenizer.chat_template") == chat.tokenizer.chat_template
    assert field("tokenizer.ggml.eos_token_id") == field("tokenizer.ggml.eot_token_id") == chat.stop_ids[0]
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "smollm"  # SmolLM2's own split: digits one by one, then GPT-2's
    assert len(field("tokenizer.ggml.tokens")) == len(chat.tokenizer) == field("llama.vocab_size")
    assert field("llama.block_count") == 2 and field("llama.attention.head_count_kv") == 2
    weights = load_file(run.merged / "model.safetensors")
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    q = tensors["blk.1.attn_q.weight"]
    assert q.tensor_type == gguf.GGMLQuantizationType.F16
    expected = permute_rotary(weights["model.layers.1.self_attn.q_proj.weight"].numpy(), 4)
    np.testing.assert_allclose(np.asarray(q.data, dtype=np.float32).reshape(64, 64), expected, atol=1e-3)
    assert not np.allclose(expected, weights["model.layers.1.self_attn.q_proj.weight"].numpy())
    q8 = {t.name: t for t in gguf.GGUFReader(run.gguf_file("tiny", "q8_0")).tensors}
    assert q8["blk.1.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_export_report_gates_and_stop(exported):
    config, output = exported
    report = json.loads((config.run_dir.gguf / "export_report.json").read_text())
    assert report["failures"] == []
    by_type = {row["gguf_type"]: row for row in report["files"]}
    assert list(by_type) == ["f16", "q8_0", "q4_k_m"]  # a gate on every type asked for
    for gguf_type, gate in (("f16", 1.1), ("q8_0", 1.2), ("q4_k_m", 12.3)):
        row = by_type[gguf_type]
        assert row["gate_pct"] == gate == DEFAULT_GATES_PCT[gguf_type]
        assert row["tokenizer_mismatches"] == 0 and row["tokenizer_texts"] > 0
        assert abs(row["perplexity_increase_pct"]) < gate
        assert row["chat_finish_reason"] == "stop" and row["chat_answer"] == "ok"
        assert row["task_metric"] == row["task_metric_merged"] == 100.0 and row["retention"] == 1.0  # chrF
    assert by_type["f16"]["top1_agreement"] > 0.99
    assert "q8_0" in output and "(100.0%)" in output and "merged model: chrf 100.0000" in output


def test_export_fails_loudly_on_a_broken_file(exported, tmp_path):
    """A GGUF whose output weights are damaged: the perplexity gate names the file and the increase."""
    from llamatailor.export.stage import Checker

    config, _ = exported
    chat = load_saved_tokenizer(config.run_dir.merged, config.model)
    path = tmp_path / "broken-f32.gguf"
    write_gguf(config.run_dir.merged, path, "f32", chat, "broken")
    reader = gguf.GGUFReader(path, "r+")
    output = next(t for t in reader.tensors if t.name == "output.weight")
    output.data[:] = np.random.default_rng(0).normal(0, 0.2, output.data.shape).astype(np.float32)
    reader.data.flush()
    checker = Checker(config, chat)
    checker.reference()
    result = checker.check("f16", path)  # judged by the f16 gate, 1.1 %
    assert any("is +" in failure and "the gate allows 1.1%" in failure for failure in result.failures), (
        result.failures
    )
    stricter = config.model_copy(update={"export": config.export.model_copy(update={"gates": {"f16": 1e6}})})
    loose = Checker(stricter, chat)
    loose.reference()
    assert not any("perplexity" in failure for failure in loose.check("f16", path).failures)


@pytest.mark.parametrize("kind", ["chatml", "llama3", "llama2"])
def test_llama_cpp_tokenizes_and_scores_like_hf(kind, tmp_path_factory):
    folder = build_tiny_model(kind, tmp_path_factory.mktemp(kind) / "model")
    chat = load_saved_tokenizer(folder, ModelSection())
    path = write_gguf(folder, folder.parent / "m.gguf", "f32", chat, kind)
    texts = [chat.tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    engine = LlamaCppEngine(kind, path, context=256, scores=True)
    try:
        result = FileCheck("f32", str(path), 0)
        check_tokenizer(engine, chat, texts, result)
        assert result.tokenizer_mismatches == 0, result.first_mismatch
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        sequences = [chat.tokenizer.encode(text, add_special_tokens=False) for text in texts]
        check_logits(engine, logit_reference(model, sequences, labels=sequences), result)  # every position
    finally:
        engine.close()
    assert result.top1_agreement == 1.0
    assert abs(result.perplexity_increase_pct) < 0.01


def test_modelfile_template_renders_the_training_template(chatml, llama3, llama2):
    extra = [
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"},
        ]
    ]
    for chat in (chatml, llama3, llama2):
        modelfile = build_modelfile(chat, "m-q8_0.gguf", "Be kind.")
        assert modelfile.template is not None and modelfile.template_matches == len(SAMPLE_CONVERSATIONS)
        for messages in [*SAMPLE_CONVERSATIONS, *extra]:
            assert render(modelfile.template, go_variables(messages)) == hf_text(chat, messages)
        assert modelfile.text.startswith('FROM ./m-q8_0.gguf\nTEMPLATE """')
        assert 'SYSTEM """Be kind."""' in modelfile.text
    assert 'PARAMETER stop "<|im_end|>"' in build_modelfile(chatml, "m.gguf", None).text
    llama3_file = build_modelfile(llama3, "m.gguf", None).text
    assert 'PARAMETER stop "<|eot_id|>"' in llama3_file and 'PARAMETER stop "<|end_of_text|>"' in llama3_file
    # SmolLM2's template adds its default system prompt when there is none; so must the Go template.
    default = "You are a helpful AI assistant named SmolLM"
    chatml_template = build_modelfile(chatml, "m.gguf", None).template
    assert default in render(chatml_template, go_variables([{"role": "user", "content": "U"}]))
    assert default not in render(chatml_template, go_variables(extra[0]))
    # Llama 2 folds the system prompt into the first user turn, and opens later turns with bos
    llama2_template = build_modelfile(llama2, "m.gguf", None).template
    two_turns = [*extra[0], {"role": "user", "content": "V"}]
    assert (
        render(llama2_template, go_variables(two_turns))
        == "[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A </s><s>[INST] V [/INST]"
    )
    assert 'PARAMETER stop "</s>"' in build_modelfile(llama2, "m.gguf", None).text


def test_go_template_renderer_follows_go_semantics():
    template = '{{ if not .System }}[default]{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}U:{{ .Content }};{{ else }}X;{{ end }}{{ end }}.'
    messages = [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}]
    assert render(template, {"Messages": messages, "System": ""}) == "[default]U:a;X;."
    assert render(template, {"Messages": messages, "System": "s"}) == "U:a;X;."
    # a variable set inside range is seen by later iterations (Go >= 1.11)
    first = "{{ $first := true }}{{ range .Messages }}{{ if $first }}F{{ else }}N{{ end }}{{ $first = false }}{{ end }}"
    assert render(first, {"Messages": messages * 2, "System": ""}) == "FNNN"
    assert (
        render("{{ range .Messages }}{{ $.System }}{{ end }}", {"Messages": messages, "System": "s"}) == "ss"
    )
    for bad in (
        "{{- .Content }}",
        "{{ .Prompt | upper }}",
        "{{ range .Messages }}",
        "{{ if gt .x 1 }}{{ end }}",
        "{{ $y }}",
    ):
        with pytest.raises(TemplateError):
            render(bad, {"Messages": [], "System": "", "Prompt": "p", "x": 1})


def test_serve_picks_the_runs_checked_gguf(exported, tmp_path):
    """`serve <run>` after a passing export: llama.cpp over the Modelfile's GGUF, answering like training."""
    from helpers import Server

    config, _ = exported
    running = Server(config.run_dir.root, log=tmp_path / "server.log")
    try:
        client = running.client(key=None)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Question number 3?"}],
            max_tokens=8,
            temperature=0,
        )
    finally:
        running.stop()
    assert reply.choices[0].message.content == "ok" and reply.choices[0].finish_reason == "stop"
    assert "llama-server over tiny-f16.gguf" in (tmp_path / "server.log").read_text()


def test_serve_passes_over_a_merge_and_export_older_than_the_adapter(exported, caplog):
    """After a new training (the adapter's weights changed, merge and export not rerun), `serve <run>`
    serves the adapter itself, on either engine choice, and says why; the old merge is never served."""
    from safetensors.torch import save_file

    from llamatailor.serve.target import ServeOptions, run_served

    def description(engine: str) -> str:
        served = run_served(config, ServeOptions(engine, context=512, slots=1))  # type: ignore[arg-type]
        served.close()
        return served.description

    config, _ = exported
    run = config.run_dir
    assert description("auto") == "llama-server over tiny-f16.gguf, 1 slot"
    adapter = run.adapter / "adapter_model.safetensors"
    original = adapter.read_bytes()
    try:
        save_file({name: t + 0.01 for name, t in load_file(adapter).items()}, adapter)  # "trained again"
        for engine in ("auto", "transformers"):
            assert description(engine) == f"transformers over {config.model.base} with tiny", engine
        assert "the merge stage's output is not up to date with the run" in caplog.text
    finally:
        adapter.write_bytes(original)
    assert description("transformers") == f"transformers over {run.merged}"


@pytest.mark.parametrize("engine", ["llama.cpp", "transformers"])
def test_serve_renders_the_training_ids_on_both_engines(exported, tmp_path, engine):
    """The run's system prompt when a request has none, a request's own when it has one, and a raw prompt
    in the model's chat format read with its special tokens: the same ids as training, on both engines."""
    from helpers import Server
    from llamatailor.data.templating import render_prompt

    config, _ = exported
    chat = load_saved_tokenizer(config.run_dir.merged, config.model)
    record = config.run_dir.read_split("train")[0]
    assert record["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}  # prepare put it there
    user_only = record["messages"][1:-1]
    trained = render_prompt(chat, record["messages"][:-1])
    assert len(render_prompt(chat, user_only)) > len(trained)  # SmolLM2's own default system text is longer
    own = [{"role": "system", "content": "Be brief."}, *user_only]
    running = Server(config.run_dir.root, "--engine", engine, log=tmp_path / "server.log")
    try:
        client = running.client(key=None)

        def prompt_tokens(messages) -> int:
            reply = client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=1, temperature=0
            )
            return reply.usage.prompt_tokens

        assert prompt_tokens(user_only) == len(trained)
        assert prompt_tokens(own) == len(render_prompt(chat, own))
        raw = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        completion = client.completions.create(model="tiny", prompt=raw, max_tokens=4, temperature=0)
    finally:
        running.stop()
    assert completion.usage.prompt_tokens == 16
    described = "llama-server" if engine == "llama.cpp" else engine
    assert f"{described} over" in (tmp_path / "server.log").read_text()


def test_a_bf16_stored_base_merges_into_bf16_and_passes_its_own_check(tmp_path, tiny_models):
    """Llama checkpoints are stored in bf16: `merge_dtype: auto` keeps bf16 (the base's config.json, not the
    fp32 the merge loads it in), and the merge's check passes although W + ΔW must be rounded to bf16."""
    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_models["chatml"], dtype=torch.bfloat16).save_pretrained(base)
    load_saved_tokenizer(
        tiny_models["chatml"], ModelSection(base=str(tiny_models["chatml"]))
    ).tokenizer.save_pretrained(base)
    rows = [conversation(f"Question number {n}?", "ok") for n in range(24)]
    run_file = prepared_run(tmp_path / "run", base, rows, train={"max_steps": 6, "learning_rate": 2e-2})
    for verb in ("train", "merge"):
        result = runner.invoke(app, [verb, str(run_file)])
        assert result.exit_code == 0, result.output
    merged = load_config(run_file).run_dir.merged
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(merged / "model.safetensors").values()} == {torch.bfloat16}
    # The rounding to bf16 moved the logits (so the check had something to allow) ...
    assert report["rounding_max_abs_logit_diff"] > 1e-4
    # ... and merged/ reloads to the very weights it was saved from.
    assert report["reload_max_abs_logit_diff"] < 1e-5, report
