"""The `eval` stage: answer the held-out test prompts with the base and the tuned model, score both.

Both models run from one load (the tuned one with its adapter disabled is exactly the base), with the
tokenizer and chat template saved beside the adapter, i.e. those used in training.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from llamatailor.config import RunConfig
from llamatailor.data.templating import render_prompt
from llamatailor.evaluate.generation import Generation, generate_all
from llamatailor.evaluate.metrics import headline_metric, score_answers
from llamatailor.evaluate.report import render_report
from llamatailor.models.loading import base_model_of, load_saved_tokenizer, load_tuned_model
from llamatailor.rundir import RunDir, read_jsonl, write_json, write_jsonl, write_text

ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, dict[str, Any]]  # "base" and "tuned"
    headline: str
    samples: list[dict[str, Any]]
    folder: Path


def evaluate_run(config: RunConfig, progress: ProgressCallback | None = None) -> EvalResult:
    run = config.run_dir
    records = run.read_split("test")[: config.eval.max_samples]
    final = run.final(config.dpo.enabled)
    chat = load_saved_tokenizer(final, config.model)
    model = load_tuned_model(config.model, final).eval()
    prompts = [render_prompt(chat, record["messages"][:-1]) for record in records]
    references = [record["messages"][-1]["content"] for record in records]

    def answer(label: str, model: PreTrainedModel) -> list[Generation]:
        done = 0

        def step(count: int) -> None:
            nonlocal done
            done += count
            if progress:
                progress(label, done, len(prompts))

        return generate_all(model, chat, prompts, config.eval.max_new_tokens, config.eval.batch_size, step)

    tuned = answer("tuned", model)
    with base_model_of(model, config.model) as base_model:
        base = answer("base", base_model)
    fields = config.eval.json_fields
    metrics = {
        name: {
            **score_answers([g.text for g in generations], references, fields),
            "stopped": sum(g.stopped for g in generations) / max(len(generations), 1),
        }
        for name, generations in (("base", base), ("tuned", tuned))
    }
    samples = [
        {
            "id": record["id"],
            "prompt": record["messages"][-2]["content"],
            "reference": reference,
            "base": base_answer.text,
            "tuned": tuned_answer.text,
            "base_stopped": base_answer.stopped,
            "tuned_stopped": tuned_answer.stopped,
        }
        for record, reference, base_answer, tuned_answer in zip(records, references, base, tuned, strict=True)
    ]
    headline = headline_metric(fields)
    write_jsonl(run.eval / "samples.jsonl", samples)
    write_json(run.eval / "metrics.json", {"headline": headline, **metrics})
    write_text(run.eval / "report.md", render_report(config.name, metrics, headline, samples))
    return EvalResult(metrics=metrics, headline=headline, samples=samples, folder=run.eval)


def load_eval_result(run: RunDir) -> EvalResult:
    """The results a completed eval stage left in the run directory."""
    saved = json.loads((run.eval / "metrics.json").read_text(encoding="utf-8"))
    headline = saved.pop("headline")
    return EvalResult(
        metrics=saved, headline=headline, samples=read_jsonl(run.eval / "samples.jsonl"), folder=run.eval
    )
