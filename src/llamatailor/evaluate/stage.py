"""The `eval` stage: the base model and the tuned one (or any merged folder or GGUF file) on the held-out
test set: generated answers and their task metrics, perplexity on val and test, failure-mode probes, and
the verdict of the training curves, side by side in `eval/metrics.json` and `eval/report.md`.

Both models get the same prompts, rendered with the tokenizer and template saved beside the trained model.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamatailor.config import ModelSection, RunConfig
from llamatailor.evaluate.judge import judge_answers
from llamatailor.evaluate.metrics import example_score, headline_metric, score_answers
from llamatailor.evaluate.perplexity import perplexity
from llamatailor.evaluate.probes import MemorisationProbe, overfitting_verdict, runaway_share
from llamatailor.evaluate.report import plot_scores, render_report
from llamatailor.evaluate.result import EvalResult
from llamatailor.generation.answers import answer_all
from llamatailor.generation.engines import Engine, LlamaCppEngine, TransformersEngine
from llamatailor.generation.prompts import TokenizerPrompter
from llamatailor.generation.text import Generation
from llamatailor.models.loading import (
    ChatTokenizer,
    base_model_of,
    load_base_model,
    load_saved_tokenizer,
    load_tuned_model,
)
from llamatailor.rundir import RunDir, read_jsonl, write_json, write_jsonl, write_text
from llamatailor.stage_contract import Progress, Stage, files_in
from llamatailor.vocabulary import TEST_SPLIT, TRAIN_SPLIT, VAL_SPLIT


@dataclass(frozen=True)
class Answers:
    generations: list[Generation]
    perplexities: dict[str, Any]


# What an `Evaluation` reads of the run file, for the stages that answer through one (eval, export), but
# eval.perplexity: export turns it off on its own copy.
EVALUATION_KEYS = (
    "model",
    "data.system_prompt",
    "data.max_seq_len",
    "eval.max_new_tokens",
    "eval.batch_size",
    "eval.max_samples",
)


class Evaluation:
    """The test set, its prompts and references, and how to run one engine over them."""

    def __init__(self, config: RunConfig, chat: ChatTokenizer, progress: Progress | None) -> None:
        run = config.run_dir
        self.config, self.chat, self.progress = config, chat, progress
        self.prompter = TokenizerPrompter(chat, config.data.system_prompt)
        self.records = run.read_split(TEST_SPLIT)[: config.eval.max_samples]
        self.prompts = [
            self.prompter.chat_ids(record["messages"][:-1], record.get("tools")) for record in self.records
        ]
        self.references = [record["messages"][-1]["content"] for record in self.records]
        self.splits = {
            name: [(r["messages"], r.get("tools")) for r in run.read_split(name)]
            for name in (VAL_SPLIT, TEST_SPLIT)
        }

    def answer(self, engine: Engine) -> Answers:
        done = 0

        def step(count: int) -> None:
            nonlocal done
            done += count
            if self.progress:
                self.progress(f"answering ({engine.label})", done, len(self.prompts))

        generations = answer_all(engine, self.prompter, self.prompts, self.config.eval.max_new_tokens, step)
        perplexities = {}
        if self.config.eval.perplexity:
            for name, conversations in self.splits.items():
                if conversations:
                    result = perplexity(engine, self.chat, conversations, self.config.data.max_seq_len)
                    perplexities[f"answer_perplexity_{name}"] = result.answers
                    perplexities[f"sequence_perplexity_{name}"] = result.sequences
        return Answers(generations, perplexities)


def evaluate_run(
    config: RunConfig, progress: Progress | None = None, model_path: Path | None = None
) -> EvalResult:
    """The eval stage; with `model_path` (a merged folder or a .gguf file) that model stands in for the
    tuned one and the results go to eval/candidates/<name>/.

    Args:
        config: The resolved run file; reads `model`, `data`, `dpo.enabled` and `eval`.
        progress: Called as `progress("answering (<model label>)", answers done, answers in all)`.
        model_path: A merged model folder or a .gguf file (run by llama.cpp) to evaluate instead of the
            run's adapter or fully fine-tuned model.

    Returns:
        EvalResult: per model ("base", "tuned") the task metrics of the greedy test answers, the answer
        and sequence perplexities on val and test with `eval.perplexity` (exp of the mean nats per
        token), the runaway and memorised shares (0..1), and the judge's score with `eval.judge`; the
        samples, per-group metrics, the training curves' verdict, and the folder written (eval/ or
        eval/candidates/<name>/).

    Raises:
        StageError: a split is missing (run `prepare`), or the judge's endpoint failed.
        ModelLoadError: the trained model, the base, its saved tokenizer, or the semantic-similarity
            model cannot be loaded.
    """
    run = config.run_dir
    final = run.final(config.dpo.enabled)
    chat = load_saved_tokenizer(final, config.model)
    evaluation = Evaluation(config, chat, progress)
    batch = config.eval.batch_size
    if model_path is None:
        tuned_model = load_tuned_model(config.model, final).eval()
        pad = chat.tokenizer.pad_token_id
        tuned = evaluation.answer(TransformersEngine("tuned", tuned_model, pad, batch))
        with base_model_of(tuned_model, config.model) as base_model:
            base = evaluation.answer(TransformersEngine("base", base_model, pad, batch))
        folder, source = run.eval, str(final)
    else:
        candidate = candidate_engine(model_path, chat, config)
        tuned = evaluation.answer(candidate)
        if isinstance(candidate, LlamaCppEngine):
            candidate.close()
        base_model = load_base_model(config.model).eval()
        base = evaluation.answer(TransformersEngine("base", base_model, chat.tokenizer.pad_token_id, batch))
        source = str(model_path.resolve())  # one name per file, from wherever it is given
        folder = candidate_folder(run.eval / "candidates", model_path)
    return write_results(config, chat, evaluation, {"base": base, "tuned": tuned}, folder, source)


STAGE = Stage(
    "eval",
    # eval.show is left out: it is what the CLI prints, read from the results
    config_keys=(
        *EVALUATION_KEYS,
        "dpo.enabled",
        "eval.json_fields",
        "eval.semantic",
        "eval.perplexity",
        "eval.memorisation_tokens",
        "eval.group_by",
        "eval.judge",
    ),
    # train.jsonl: the memorisation probe; metrics.jsonl: the training curves' verdict
    inputs=lambda config: [
        *(config.run_dir.split(name) for name in (TRAIN_SPLIT, VAL_SPLIT, TEST_SPLIT)),
        *files_in(config.run_dir.final(config.dpo.enabled)),
        config.run_dir.metrics,
    ],
    outputs=lambda config: [
        config.run_dir.eval / name for name in ("metrics.json", "samples.jsonl", "report.md")
    ],
    action=evaluate_run,
    load_result=lambda config: load_eval_result(config.run_dir),
)


def candidate_folder(candidates: Path, model_path: Path) -> Path:
    """Where an evaluation of `model_path` goes: candidates/<file stem>/, or <stem>-2, -3… when that name
    holds the results of another file (two `model.gguf` from different folders), so no evaluation
    overwrites another's; evaluating the same file again replaces its own results."""
    source, number = str(model_path.resolve()), 1
    while True:
        folder = candidates / (model_path.stem if number == 1 else f"{model_path.stem}-{number}")
        metrics = folder / "metrics.json"
        if (
            not metrics.is_file()
            or json.loads(metrics.read_text(encoding="utf-8")).get("tuned_source") == source
        ):
            return folder
        number += 1


def candidate_engine(path: Path, chat: ChatTokenizer, config: RunConfig) -> Engine:
    if path.suffix == ".gguf":
        context = config.data.max_seq_len + config.eval.max_new_tokens
        return LlamaCppEngine("candidate", path, context, scores=config.eval.perplexity)
    model = load_base_model(ModelSection(base=str(path), family=config.model.family)).eval()
    return TransformersEngine("candidate", model, chat.tokenizer.pad_token_id, config.eval.batch_size)


def write_results(
    config: RunConfig,
    chat: ChatTokenizer,
    evaluation: Evaluation,
    answers: dict[str, Answers],
    folder: Path,
    source: str,
) -> EvalResult:
    ev = config.eval
    probe = MemorisationProbe(training_answers(config.run_dir, chat), ev.memorisation_tokens)
    metrics = {}
    for name, model_answers in answers.items():
        texts = [g.text for g in model_answers.generations]
        metrics[name] = {
            **score_answers(texts, evaluation.references, ev.json_fields, semantic=ev.semantic),
            **model_answers.perplexities,
            "runaway_share": runaway_share(model_answers.generations),
            "memorised_share": probe.share(
                [chat.tokenizer.encode(t, add_special_tokens=False) for t in texts]
            ),
        }
        if ev.judge is not None:
            user_prompts = [record["messages"][-2]["content"] for record in evaluation.records]
            verdict = judge_answers(ev.judge, user_prompts, evaluation.references, texts)
            metrics[name].update(judge_score=verdict.mean_score, judge_unparsed=verdict.unparsed)
    samples = sample_rows(evaluation, answers, ev.json_fields)
    groups = group_metrics(evaluation, answers, ev.group_by, ev.json_fields) if ev.group_by else {}
    training = overfitting_verdict(config.run_dir.metrics)
    headline = headline_metric(ev.json_fields)
    result = EvalResult(metrics, headline, samples, folder, groups, training, source)
    write_jsonl(folder / "samples.jsonl", samples)
    write_json(
        folder / "metrics.json",
        {"headline": headline, "tuned_source": source, **metrics, "groups": groups, "training": training},
    )
    plot_scores(samples, folder / "scores.png")
    write_text(folder / "report.md", render_report(config.name, result))
    return result


def training_answers(run: RunDir, chat: ChatTokenizer) -> list[list[int]]:
    return [
        chat.tokenizer.encode(message["content"], add_special_tokens=False)
        for record in run.read_split(TRAIN_SPLIT)
        for message in record["messages"]
        if message["role"] == "assistant"
    ]


def sample_rows(
    evaluation: Evaluation, answers: dict[str, Answers], json_fields: list[str] | None
) -> list[dict[str, Any]]:
    rows = []
    for index, (record, reference) in enumerate(zip(evaluation.records, evaluation.references, strict=True)):
        base, tuned = answers["base"].generations[index], answers["tuned"].generations[index]
        rows.append(
            {
                "id": record["id"],
                "prompt": record["messages"][-2]["content"],
                "reference": reference,
                "base": base.text,
                "tuned": tuned.text,
                "base_stopped": base.stopped,
                "tuned_stopped": tuned.stopped,
                "base_score": example_score(base.text, reference, json_fields),
                "tuned_score": example_score(tuned.text, reference, json_fields),
                **({"meta": record["meta"]} if "meta" in record else {}),
            }
        )
    return rows


def group_metrics(
    evaluation: Evaluation, answers: dict[str, Answers], group_by: str, json_fields: list[str] | None
) -> dict[str, dict[str, dict[str, Any]]]:
    """Task metrics per value of a record field (a language, say), for each model."""
    values = [record.get("meta", {}).get(group_by) for record in evaluation.records]
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for value in sorted({str(v) for v in values if v is not None}):
        chosen = [i for i, v in enumerate(values) if str(v) == value]
        references = [evaluation.references[i] for i in chosen]
        groups[value] = {
            name: score_answers([result.generations[i].text for i in chosen], references, json_fields)
            for name, result in answers.items()
        }
    return groups


def load_eval_result(run: RunDir) -> EvalResult:
    """The results a completed eval stage left in the run directory."""
    saved = json.loads((run.eval / "metrics.json").read_text(encoding="utf-8"))
    metrics = {name: saved[name] for name in ("base", "tuned")}
    return EvalResult(
        metrics=metrics,
        headline=saved["headline"],
        samples=read_jsonl(run.eval / "samples.jsonl"),
        folder=run.eval,
        groups=saved.get("groups", {}),
        training=saved.get("training", {}),
        tuned_source=saved.get("tuned_source", ""),
    )
