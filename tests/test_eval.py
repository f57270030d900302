"""The eval stage: probes built to trip, per-group metrics, the LLM judge over HTTP, the report."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from helpers import alpaca_rows, read_rows, write_jsonl, write_run_file
from llamatailor.cli import app
from llamatailor.data.templating import render_prompt
from llamatailor.evaluate.probes import MemorisationProbe, overfitting_verdict, runaway_share
from llamatailor.evaluate.stage import candidate_folder
from llamatailor.generation.answers import answer_all
from llamatailor.generation.engines import TransformersEngine
from llamatailor.generation.prompts import TokenizerPrompter
from llamatailor.generation.text import Generation

runner = CliRunner()


def test_runaway_probe_on_models_built_to_never_and_always_stop(tiny_models, chatml):
    prompts = [render_prompt(chatml, [{"role": "user", "content": q}]) for q in ("hi", "tell me more")]
    end = chatml.tokenizer.convert_tokens_to_ids("<|im_end|>")
    word = chatml.tokenizer.encode(" yes", add_special_tokens=False)[0]
    shares = {}
    for name, favoured in (("never", word), ("always", end)):
        model = AutoModelForCausalLM.from_pretrained(tiny_models["chatml"]).eval()
        with torch.no_grad():
            model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
            model.lm_head.bias[favoured] = 1e4
        engine = TransformersEngine(name, model, chatml.tokenizer.pad_token_id, batch_size=2)
        shares[name] = runaway_share(answer_all(engine, TokenizerPrompter(chatml), prompts, 6))
    assert shares == {"never": 1.0, "always": 0.0}
    assert runaway_share([Generation("a", 3, True), Generation("b", 6, False)]) == 0.5


def test_memorisation_probe_flags_verbatim_runs_only(chatml):
    encode = lambda text: chatml.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    secret = "The quarterly revenue of the northern division rose by twelve percent, driven by new contracts in logistics and a strong second half."
    probe = MemorisationProbe([encode(secret), encode("a short unrelated answer")], size=16)
    assert len(encode(secret)) > 16
    copied = encode("As noted: " + secret)
    paraphrased = encode("Revenue in the north grew about twelve percent thanks to logistics deals.")
    assert probe.memorised(copied) and not probe.memorised(paraphrased)
    assert probe.share([copied, paraphrased]) == 0.5


def test_overfitting_verdict_from_curves(tmp_path):
    rows = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "eval_loss": 1.5},
        {"step": 3, "loss": 1.0},
        {"step": 4, "eval_loss": 1.2},
        {"step": 5, "loss": 0.5},
        {"step": 6, "eval_loss": 1.6},
    ]
    path = write_jsonl(tmp_path / "metrics.jsonl", rows)
    verdict = overfitting_verdict(path)
    assert verdict["verdict"] == "overfitting" and verdict["best_step"] == 4
    assert verdict["val_rise_after_best"] == pytest.approx(1.6 / 1.2 - 1)
    healthy = write_jsonl(tmp_path / "ok.jsonl", rows[:4])
    assert overfitting_verdict(healthy)["verdict"] == "no overfitting"
    assert overfitting_verdict(tmp_path / "none.jsonl")["verdict"] == "unknown"


class JudgeHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions: 5 when the graded answer equals the reference, else 1."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = body["messages"][-1]["content"]
        reference = question.split("Reference answer:\n")[1].split("\n\nAnswer to grade:")[0]
        answer = question.split("Answer to grade:\n")[1]
        reply = {
            "id": "judge-1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "5" if answer == reference else "1"},
                }
            ],
        }
        payload = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_eval_report_groups_and_judge(tmp_path, tiny_models):
    rows = [{**row, "language": "en" if n % 2 else "fr"} for n, row in enumerate(alpaca_rows(24))]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = {"base_url": f"http://127.0.0.1:{server.server_port}/v1", "model": "grader"}
        run_file = write_run_file(
            tmp_path,
            tiny_models["chatml"],
            [data],
            data={"meta_fields": ["language"], "test_ratio": 0.5},
            eval={"group_by": "language", "judge": judge, "max_new_tokens": 6},
        )
        result = runner.invoke(app, ["run", str(run_file)])
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    for model in ("base", "tuned"):
        m = metrics[model]
        assert m["count"] == 12 and m["judge_score"] == 1.0 and m["judge_unparsed"] == 0
        for key in (
            "rouge_l",
            "bleu",
            "chrf",
            "semantic_similarity",
            "json_field_f1",
            "runaway_share",
            "memorised_share",
        ):
            assert key in m
        assert m["answer_perplexity_test"] > 1 and m["sequence_perplexity_val"] > 1
    assert sorted(metrics["groups"]) == ["en", "fr"]
    assert metrics["groups"]["en"]["tuned"]["count"] + metrics["groups"]["fr"]["tuned"]["count"] == 12
    samples = read_rows(run / "eval" / "samples.jsonl")
    assert {"prompt", "reference", "base", "tuned", "base_score", "tuned_score"} <= samples[0].keys()
    report = (run / "eval" / "report.md").read_text()
    assert "| metric | base | tuned | delta |" in report and "## Worst tuned answers" in report
    assert "## Group `fr`" in report and "## Training curves" in report
    assert (run / "eval" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    for split in ("val", "test"):
        expected = own_answer_perplexity(tiny_models["chatml"], run, split)
        assert metrics["tuned"][f"answer_perplexity_{split}"] == pytest.approx(expected, rel=1e-4)


def own_answer_perplexity(base, run, split):
    """exp of the tuned model's own mean cross-entropy (transformers' loss) over a split's answer tokens."""
    from peft import PeftModel

    from llamatailor.config import ModelSection
    from llamatailor.data.templating import render_for_training
    from llamatailor.models.loading import load_saved_tokenizer

    chat = load_saved_tokenizer(run / "adapter", ModelSection())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / "adapter").eval()
    total = tokens = 0.0
    for record in read_rows(run / "data" / f"{split}.jsonl"):
        sample = render_for_training(chat, record["messages"], 128, record.get("tools"))  # max_seq_len
        count = sum(label != -100 for label in sample.labels[1:])
        with torch.no_grad():
            loss = model(torch.tensor([sample.input_ids]), labels=torch.tensor([sample.labels])).loss
        total, tokens = total + float(loss) * count, tokens + count
    return float(torch.exp(torch.tensor(total / tokens, dtype=torch.float64)))


@pytest.mark.slow
def test_eval_runs_a_gguf_file_through_llama_cpp(tmp_path):
    from pathlib import Path

    from llamatailor.models.source import embedded_gguf_path

    demo = Path(__file__).parent.parent / "examples" / "data" / "stdlib_signatures.jsonl"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(demo.read_text().splitlines(keepends=True)[:16]))
    run_file = write_run_file(
        tmp_path,
        "smollm2-135m-instruct",
        [data],
        data={"max_seq_len": 256, "val_ratio": 0.2, "test_ratio": 0.2},
        train={"max_steps": 1, "batch_size": 2},
        eval={"max_new_tokens": 8, "semantic": False, "json_fields": ["module", "function"]},
    )
    for verb in ("prepare", "train"):
        assert runner.invoke(app, [verb, str(run_file)]).exit_code == 0
    gguf = embedded_gguf_path("smollm2-135m-instruct")  # the base model itself, quantized Q4_1
    own = tmp_path / "runs" / "tiny" / "eval" / "metrics.json"  # the run's own results, as eval left them
    own.parent.mkdir(parents=True, exist_ok=True)
    own.write_text('{"headline": "rougeL"}')
    manifest = (tmp_path / "runs" / "tiny" / "manifest.json").read_bytes()
    result = runner.invoke(app, ["eval", str(run_file), "--model", str(gguf)])
    assert result.exit_code == 0, result.output
    assert own.read_text() == '{"headline": "rougeL"}'
    assert (tmp_path / "runs" / "tiny" / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in own.parent.iterdir()) == ["candidates", "metrics.json"]
    metrics = json.loads(
        (tmp_path / "runs" / "tiny" / "eval" / "candidates" / gguf.stem / "metrics.json").read_text()
    )
    assert metrics["tuned_source"] == str(gguf.resolve())
    for split in ("val", "test"):
        ratio = metrics["tuned"][f"answer_perplexity_{split}"] / metrics["base"][f"answer_perplexity_{split}"]
        assert ratio == pytest.approx(1.0, abs=0.1), "llama.cpp's Q4_1 scores like the dequantized base"
    assert metrics["tuned"]["count"] == metrics["base"]["count"] == 3


def test_candidate_evaluations_never_overwrite_one_another(tmp_path):
    """Two files with one stem get folders of their own; the same file again gets its own folder back."""
    candidates = tmp_path / "eval" / "candidates"
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    assert candidate_folder(candidates, first) == candidates / "model"
    (candidates / "model").mkdir(parents=True)
    (candidates / "model" / "metrics.json").write_text(json.dumps({"tuned_source": str(first)}))
    assert candidate_folder(candidates, first) == candidates / "model"
    assert candidate_folder(candidates, tmp_path / "b" / ".." / "a" / "model.gguf") == candidates / "model"
    assert candidate_folder(candidates, second) == candidates / "model-2"
    (candidates / "model-2").mkdir()
    (candidates / "model-2" / "metrics.json").write_text(json.dumps({"tuned_source": str(second)}))
    assert candidate_folder(candidates, second) == candidates / "model-2"
    assert candidate_folder(candidates, tmp_path / "c" / "model.gguf") == candidates / "model-3"
