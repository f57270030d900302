"""The `export` stage: GGUF files of the merged model, each checked by llama.cpp, an Ollama Modelfile, and
`gguf/export_report.json` with the quality-retention table; with `export.lora_gguf`, also the untuned base
as a GGUF and the run's adapter as a llama.cpp LoRA GGUF (export/gguf_lora.py), checked together. A file
that fails a gate fails the stage, after the report is written, naming the file and by how much."""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM

from llamatailor.config import RunConfig
from llamatailor.errors import CheckFailed, StageError
from llamatailor.evaluate.metrics import headline_metric, score_answers
from llamatailor.evaluate.probes import runaway_share
from llamatailor.evaluate.stage import EVALUATION_KEYS, Evaluation
from llamatailor.export.gguf_check import (
    FileCheck,
    apply_gates,
    check_chat_stops,
    check_logits,
    check_metadata,
    check_tokenizer,
    logit_reference,
)
from llamatailor.export.gguf_file import WRITTEN_HERE, check_export, quantize_gguf, write_gguf
from llamatailor.export.gguf_gates import gate_for
from llamatailor.export.gguf_lora import (
    LORA_BASE_TYPE,
    LoraCheck,
    attach_lora,
    check_lora,
    lora_gguf_paths,
    write_lora_files,
)
from llamatailor.export.merge import build_probe
from llamatailor.export.ollama import build_modelfile, write_modelfile
from llamatailor.generation.engines import LlamaCppEngine, TransformersEngine
from llamatailor.hardware import cpu_threads
from llamatailor.models.loading import ChatTokenizer, load_saved_tokenizer, load_tuned_model
from llamatailor.rundir import remove_path, write_json
from llamatailor.stage_contract import Progress, Stage, files_in, no_progress
from llamatailor.vocabulary import TEST_SPLIT, VAL_SPLIT, GgufType


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    files: list[dict[str, Any]]
    headline: str
    modelfile: str
    modelfile_template: bool
    failures: list[str]
    lora: dict[str, Any] | None = None  # the LoraCheck of gguf_lora.lora_gguf_paths, with export.lora_gguf


def export_run(config: RunConfig, progress: Progress | None = None) -> ExportResult:
    """Run the `export` stage: write and check every GGUF type asked for, and the Ollama Modelfile.

    GGUF files are written with the `gguf` package (llama.cpp's writer) and quantized with llama.cpp's
    `llama_model_quantize`; each is then loaded by llama.cpp (llama-cpp-python) and checked as
    `export.gguf_check` describes, against the merged model in fp32.

    Args:
        config: The resolved run file; reads `name`, `model`, `data`, `eval` and `export` (`gguf`,
            `gates`, `modelfile_from`, `lora_gguf`; `merge_tolerance` and `dpo.enabled` with `lora_gguf`).
        progress: Told what is being done (a message, no count) as each file is written and checked.

    Returns:
        ExportResult: gguf/, one `FileCheck` dict per file (sizes in MiB, perplexities, the increase
        in %, top-1 agreement, task metric and retention), the headline metric's name, the Modelfile's
        path and whether it has a TEMPLATE, the failures (empty when returned), and with
        `export.lora_gguf` the LoraCheck of the base GGUF with the adapter GGUF.

    Raises:
        StageError: merged/ has no model (run `llamatailor merge` first), or a split is missing.
        CheckFailed: the model cannot be exported (not a Llama 1-3 or text-only Llama 4, a Llama 4 config
            llama.cpp hard-codes otherwise, an unsupported RoPE or tokenizer, a quantization that llama.cpp
            refuses), or a file fails a gate; the report is written first.
        ModelLoadError: the merged model's tokenizer has no chat template.
    """
    run, settings = config.run_dir, config.export
    if not (run.merged / "config.json").is_file():
        raise StageError(f"{run.merged} has no merged model: run `llamatailor merge` first")
    say = progress or no_progress
    chat = load_saved_tokenizer(run.merged, config.model)
    checker = Checker(config, chat)
    say("merged model: reference logits and task metric")
    checker.reference()
    checks = []
    for gguf_type, path in write_files(config, chat, say):
        say(f"checking {path.name} with llama.cpp")
        checks.append(checker.check(gguf_type, path))
    lora = export_lora(config, checker, say) if settings.lora_gguf else None
    chosen = settings.modelfile_from or settings.gguf[0]
    modelfile = build_modelfile(chat, run.gguf_file(config.name, chosen).name, config.data.system_prompt)
    write_modelfile(run.gguf / "Modelfile", modelfile)
    failures = [f"{Path(c.path).name}: {failure}" for c in checks for failure in c.failures]
    failures += [f"{Path(lora.adapter).name}: {failure}" for failure in lora.failures] if lora else []
    result = ExportResult(
        folder=run.gguf,
        files=[asdict(c) for c in checks],
        headline=checker.headline,
        modelfile=str(run.gguf / "Modelfile"),
        modelfile_template=modelfile.template is not None,
        failures=failures,
        lora=asdict(lora) if lora else None,
    )
    write_json(run.gguf / "export_report.json", {**asdict(result), "folder": str(result.folder)})
    if failures:
        raise CheckFailed(
            "export gates failed (report in gguf/export_report.json):\n  " + "\n  ".join(failures)
        )
    return result


STAGE = Stage(
    "export",
    config_keys=(
        *EVALUATION_KEYS,
        "eval.json_fields",
        "export.gguf",
        "export.gates",
        "export.modelfile_from",
        "export.check_samples",
        "export.lora_gguf",
        "export.merge_tolerance",
        "dpo.enabled",
    ),
    inputs=lambda config: [
        config.run_dir.split(VAL_SPLIT),
        config.run_dir.split(TEST_SPLIT),
        *files_in(config.run_dir.merged),
        *(files_in(config.run_dir.final(config.dpo.enabled)) if config.export.lora_gguf else []),
    ],
    outputs=lambda config: [
        *(config.run_dir.gguf_file(config.name, gguf_type) for gguf_type in config.export.gguf),
        *(lora_gguf_paths(config) if config.export.lora_gguf else ()),
        config.run_dir.gguf / "Modelfile",
        config.run_dir.gguf / "export_report.json",
    ],
    action=export_run,
    enabled=lambda config: bool(config.export.gguf),
    activity="exporting",
)


def write_files(config: RunConfig, chat: ChatTokenizer, say: Progress) -> list[tuple[GgufType, Path]]:
    """Every requested type; quantized types come from one full-precision file written first."""
    run, wanted = config.run_dir, config.export.gguf
    written = {t: run.gguf_file(config.name, t) for t in wanted if t in WRITTEN_HERE}
    for gguf_type, path in written.items():
        say(f"writing {path.name}")
        write_gguf(run.merged, path, gguf_type, chat, config.name)
    quantized = [t for t in wanted if t not in WRITTEN_HERE]
    if quantized:
        source = next(iter(written.values()), None)
        temporary = source is None
        if source is None:
            source = run.gguf / f".{config.name}-f32.source.gguf"
            say("writing a full-precision source for llama.cpp's quantizer")
            write_gguf(run.merged, source, "f32", chat, config.name)
        for gguf_type in quantized:
            say(f"quantizing to {gguf_type}")
            quantize_gguf(source, run.gguf_file(config.name, gguf_type), gguf_type, cpu_threads())
        if temporary:
            remove_path(source)
    return [(t, run.gguf_file(config.name, t)) for t in wanted]


def export_lora(config: RunConfig, checker: "Checker", say: Progress) -> LoraCheck:
    """Write the base GGUF and the adapter GGUF (gguf_lora.write_lora_files) and check them together: against
    the adapter model (gguf_lora.check_lora), then by every check and gate a GGUF file gets, the adapter
    applied (the base type's perplexity gate, against the merged model)."""
    run = config.run_dir
    say("writing the base model's GGUF and the adapter's LoRA GGUF")
    base, adapter = write_lora_files(config, checker.chat, run.merged)
    say(f"checking {adapter.name} on {base.name} against the adapter model")
    model = load_tuned_model(config.model, run.final(config.dpo.enabled)).eval()
    result = check_lora(model, checker.chat, base, adapter, checker.probe, config.export.merge_tolerance)
    del model
    say(f"checking {base.name} with {adapter.name} with llama.cpp")
    file_check = checker.check(LORA_BASE_TYPE, base, lora=adapter)
    result.file_check = asdict(file_check)
    result.failures += file_check.failures
    return result


class Checker:
    """The merged model's numbers, computed once, and the checks of each file against them."""

    def __init__(self, config: RunConfig, chat: ChatTokenizer) -> None:
        self.config, self.chat = config, chat
        self.headline = headline_metric(config.eval.json_fields)
        no_perplexity = config.eval.model_copy(update={"perplexity": False})
        self.evaluation = Evaluation(config.model_copy(update={"eval": no_perplexity}), chat, None)
        self.probe = build_probe(config, chat)
        run = config.run_dir
        self.rope = check_export(run.merged)  # refuses what llama.cpp would run differently
        conversations = [r["messages"] for name in (VAL_SPLIT, TEST_SPLIT) for r in run.read_split(name)]
        self.texts = [chat.tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]

    def reference(self) -> None:
        """Load merged/ in fp32 and keep its answer-token log-probabilities and top-1 tokens on the check
        conversations (`logit_reference`), its task metric and its share of runaway answers."""
        model = AutoModelForCausalLM.from_pretrained(self.config.run_dir.merged, dtype="float32").eval()
        self.logits = logit_reference(model, self.probe.sequences, self.probe.labels)
        engine = TransformersEngine(
            "merged", model, self.chat.tokenizer.pad_token_id, self.config.eval.batch_size
        )
        self.task_merged, self.merged_runaway = self.task_metric(engine)

    def task_metric(self, engine: TransformersEngine | LlamaCppEngine) -> tuple[float | None, float | None]:
        """The headline metric of the greedy test answers, and the share that ran on without stopping."""
        if not self.evaluation.prompts:
            return None, None
        generations = self.evaluation.answer(engine).generations
        texts = [generation.text for generation in generations]
        scores = score_answers(
            texts, self.evaluation.references, self.config.eval.json_fields, semantic=False
        )
        return scores[self.headline], runaway_share(generations)

    def check(self, gguf_type: GgufType, path: Path, lora: Path | None = None) -> FileCheck:
        """Every check of one GGUF file, run by llama.cpp with a context of `data.max_seq_len +
        eval.max_new_tokens` tokens, then its gate applied (call `reference` first).

        Args:
            gguf_type: The file's type ("f16", "q8_0", ...), which picks its perplexity gate.
            path: The GGUF file.
            lora: A LoRA GGUF that llama.cpp applies to `path` for every check (gguf_lora.attach_lora).

        Returns:
            FileCheck: size in MiB, metadata problems, tokenizer mismatches, top-1 agreement (0..1),
            answer-token perplexity of the file and of the merged model and the increase in %, task
            metric and retention (file / merged), the chat answer's finish reason, and `failures`
            (empty when every gate passes; the stage raises on them).
        """
        result = FileCheck(gguf_type, str(path), round(path.stat().st_size / 2**20, 1))
        result.metadata_problems = check_metadata(path, self.chat, self.rope)
        context = self.config.data.max_seq_len + self.config.eval.max_new_tokens
        engine = LlamaCppEngine(gguf_type, path, context, scores=True)
        try:
            if lora is not None:
                attach_lora(engine.llm, lora)
            check_tokenizer(engine, self.chat, self.texts, result)
            check_logits(engine, self.logits, result)
            result.task_metric, _ = self.task_metric(engine)
            result.task_metric_merged = self.task_merged
            if self.merged_runaway is not None:
                result.merged_stop_share = 1 - self.merged_runaway
            if result.task_metric is not None and self.task_merged:
                result.retention = result.task_metric / self.task_merged
            first = self.evaluation.records[0]["messages"][:-1] if self.evaluation.records else []
            check_chat_stops(
                engine,
                first or [{"role": "user", "content": "Hello"}],
                self.config.eval.max_new_tokens,
                result,
            )
        finally:
            engine.close()
        apply_gates(result, gate_for(gguf_type, self.config.export.gates), self.chat.stop_ids[0])
        return result
