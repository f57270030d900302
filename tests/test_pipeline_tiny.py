"""`llamatailor run` end to end on a tiny model: run directory contents, manifest, skipping, PEFT loading."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from helpers import alpaca_rows, write_jsonl, write_run_file
from llamatailor.chat import ChatSession
from llamatailor.cli import app
from llamatailor.config import load_config
from llamatailor.models.loading import load_saved_tokenizer, load_tuned_model

runner = CliRunner()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("pipeline")
    data = write_jsonl(folder / "train.jsonl", alpaca_rows(30))
    run_file = write_run_file(folder, tiny_models["chatml"], [data])
    result = runner.invoke(app, ["run", str(run_file)])
    assert result.exit_code == 0, result.output
    return run_file, folder / "runs" / "tiny", result.output


def test_run_directory_holds_every_artifact(finished_run):
    _, run, output = finished_run
    for name in (
        "config.yaml",
        "manifest.json",
        "data/train.jsonl",
        "data/val.jsonl",
        "data/test.jsonl",
        "data/rejected.jsonl",
        "data/report.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json",
        "adapter/chat_template.jinja",
        "adapter/llamatailor.json",
        "metrics.jsonl",
        "eval/metrics.json",
        "eval/samples.jsonl",
        "eval/report.md",
    ):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert not list(run.rglob(".*.tmp")), "no temporary files left behind"
    info = json.loads((run / "adapter" / "llamatailor.json").read_text())
    assert info["family"] == "chatml" and info["stop_tokens"] == ["<|im_end|>"]
    assert "score (json_field_f1): base" in output


def test_metrics_log_has_a_line_per_step(finished_run):
    _, run, _ = finished_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train_rows] == [1, 2, 3, 4]
    for row in train_rows:
        assert row["loss"] > 0 and row["tokens_per_s"] > 0 and row["rss_mb"] > 0
        assert {"lr", "grad_norm", "tokens_seen"} <= row.keys()
    assert [row["step"] for row in rows if "eval_loss" in row] == [2, 4]


def test_manifest_records_versions_hashes_and_stages(finished_run):
    _, run, _ = finished_run
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["packages"]["torch"].startswith("2.13.0")
    assert len(manifest["config_hash"]) == 64
    for stage in ("prepare", "train", "eval"):
        record = manifest["stages"][stage]
        assert record["status"] == "complete" and record["seconds"] >= 0 and len(record["fingerprint"]) == 64
    data_file = str((run.parent.parent / "train.jsonl").resolve())
    assert list(manifest["stages"]["prepare"]["inputs"]) == [data_file]
    assert manifest["stages"]["train"]["summary"]["steps"] == 4
    assert manifest["stages"]["train"]["summary"]["planned_peak_bytes"] > 0
    eval_metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert eval_metrics["headline"] == "json_field_f1"
    assert {"base", "tuned"} <= eval_metrics.keys() and eval_metrics["tuned"]["count"] == 6


def test_second_run_skips_and_a_changed_key_reruns_what_depends_on_it(finished_run):
    run_file, run, _ = finished_run
    adapter = run / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    again = runner.invoke(app, ["run", str(run_file)])
    assert again.exit_code == 0, again.output
    assert again.output.count("up to date for this config and inputs, skipped") == 3
    assert adapter.stat().st_mtime_ns == before
    changed = runner.invoke(app, ["run", str(run_file), "eval.max_new_tokens=4"])
    assert changed.exit_code == 0, changed.output
    assert "prepare: up to date" in changed.output and "train: up to date" in changed.output
    assert "eval: up to date" not in changed.output
    assert adapter.stat().st_mtime_ns == before


def test_adapter_loads_with_plain_peft_and_gives_the_same_logits(finished_run, tiny_models):
    run_file, run, _ = finished_run
    config = load_config(run_file)
    ours = load_tuned_model(config.model, run / "adapter").eval()
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_models["chatml"]), run / "adapter"
    )
    plain.eval()
    ids = torch.tensor([[1, 504, 3300, 28, 2, 198]])
    with torch.no_grad():
        ours_logits, plain_logits = ours(input_ids=ids).logits, plain(input_ids=ids).logits
        with ours.disable_adapter():
            base_logits = ours(input_ids=ids).logits
    assert torch.equal(ours_logits, plain_logits)
    assert not torch.allclose(ours_logits, base_logits), "the adapter must change the model"


def test_chat_prompt_prints_the_models_greedy_answer(finished_run):
    run_file, run, _ = finished_run
    expected = ChatSession(load_config(run_file), max_new_tokens=6).reply("n = 3")
    result = runner.invoke(app, ["chat", str(run), "--prompt", "n = 3", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == expected.strip()
    assert load_saved_tokenizer(run / "adapter", load_config(run_file).model).family.name == "chatml"


def test_chat_repl_keeps_the_conversation_until_exit(finished_run):
    run_file, run, _ = finished_run
    session = ChatSession(load_config(run_file), max_new_tokens=4)
    first, second = session.reply("n = 1"), session.reply("n = 2")
    result = runner.invoke(app, ["chat", str(run), "--max-new-tokens", "4"], input="n = 1\nn = 2\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("model>") == 2
    assert first in result.stdout and second in result.stdout


def test_force_runs_every_stage_and_training_resumes_at_its_end(finished_run):
    """Last in this file: it rewrites the run the tests above read."""
    run_file, run, _ = finished_run
    forced = runner.invoke(app, ["run", str(run_file), "--force"])
    assert forced.exit_code == 0, forced.output
    assert "up to date" not in forced.output
    assert [line.split(":")[0] for line in forced.output.splitlines() if "off in this run file" in line] == [
        "dpo",
        "merge",
        "export",
    ]
    assert f"resumed from {run / 'checkpoints' / 'checkpoint-4'}" in forced.output.replace("\n", "")
    assert "score (json_field_f1): base" in forced.output
