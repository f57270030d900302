"""The dpo stage: continues the SFT adapter and raises the chosen-over-rejected margin."""

import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from helpers import alpaca_rows, read_rows, write_jsonl, write_run_file
from llamatailor.cli import app
from llamatailor.config import load_config
from llamatailor.data.templating import IGNORE_INDEX, render_for_training
from llamatailor.models.loading import load_saved_tokenizer

runner = CliRunner()


def answer_logprob(model, chat, prompt, answer) -> float:
    sample = render_for_training(chat, [*prompt, {"role": "assistant", "content": answer}], 512)
    ids = torch.tensor([sample.input_ids])
    labels = torch.tensor(sample.labels[1:])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    picked = logprobs[labels != IGNORE_INDEX].gather(-1, labels[labels != IGNORE_INDEX, None])
    return float(picked.sum())


def mean_margin(model, chat, pairs) -> float:
    margins = [
        answer_logprob(model, chat, p["prompt"], p["chosen"])
        - answer_logprob(model, chat, p["prompt"], p["rejected"])
        for p in pairs
    ]
    return sum(margins) / len(margins)


def test_dpo_continues_sft_and_raises_the_margin(tmp_path, tiny_models):
    sft = write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(16))
    prefs = write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": f"n = {n}", "chosen": json.dumps({"next": n + 1}), "rejected": "I cannot count."}
            for n in range(16)
        ],
    )
    run_file = write_run_file(
        tmp_path,
        tiny_models["chatml"],
        [sft, prefs],
        train={"max_steps": 4},
        dpo={
            "enabled": True,
            "max_steps": 12,
            "learning_rate": 5e-3,
            "beta": 0.1,
            "batch_size": 4,
            "save_steps": 6,
            "logging_steps": 1,
        },
    )
    result = runner.invoke(app, ["run", str(run_file)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    manifest = json.loads((run / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in ("prepare", "train", "dpo", "eval")] == ["complete"] * 4
    margins = [
        row["reward_margin"] for row in read_rows(run / "dpo" / "metrics.jsonl") if "reward_margin" in row
    ]
    assert abs(margins[0]) < 1e-3, "the policy starts as its reference, the SFT model"
    assert margins[-1] > margins[0]
    assert "chosen-over-rejected reward margin" in result.output

    config = load_config(run_file)
    chat = load_saved_tokenizer(run / "dpo" / "adapter", config.model)
    pairs = read_rows(run / "data" / "preference" / "train.jsonl")
    base = AutoModelForCausalLM.from_pretrained(tiny_models["chatml"])
    sft_model = PeftModel.from_pretrained(base, run / "adapter").eval()
    before = mean_margin(sft_model, chat, pairs)
    dpo_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_models["chatml"]), run / "dpo" / "adapter"
    ).eval()
    after = mean_margin(dpo_model, chat, pairs)
    assert after > before + 1.0, (before, after)
    assert json.loads((run / "dpo" / "adapter" / "llamatailor.json").read_text())["method"] == "lora+dpo"


def test_dpo_verb_needs_it_enabled(tmp_path, tiny_models):
    run_file = write_run_file(
        tmp_path, tiny_models["chatml"], [write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))]
    )
    result = runner.invoke(app, ["dpo", str(run_file)])
    assert result.exit_code == 2
    assert "dpo.enabled is false; set it (or pass dpo.enabled=true) to run DPO" in result.output
