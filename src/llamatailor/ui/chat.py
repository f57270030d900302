"""Chat side by side: one prompt answered by a run's base model, its tuned model and each GGUF it exported.

Every column goes through the one generation path of `llamatailor chat` and `serve`: the engine and prompter a
`chat.ChatSession` builds (the base, or the run's final model: the DPO adapter with `dpo.enabled`, else
adapter/ or model/; both prompted by the tokenizer and template saved with it, with the run's
`data.system_prompt`), or for a GGUF file a `LlamaCppEngine` prompted by that same run prompter (as eval and
serve run a run's GGUF: export checked that llama.cpp tokenizes identically); then
`generation.answers.stream_answer`, greedy, as `chat` decodes.

Single-turn: each prompt is a new conversation (no history). The models answer one after another, in the
columns' order, so each has the whole machine and no more than one model generates at a time; a column
whose model cannot load or answer says why and the next column goes on.
"""

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamatailor.chat import ChatSession
from llamatailor.config import RunConfig, load_config
from llamatailor.errors import LlamatailorError, ModelLoadError
from llamatailor.generation.answers import stream_answer
from llamatailor.generation.engines import GREEDY, Engine, LlamaCppEngine
from llamatailor.generation.prompts import Prompter, TokenizerPrompter
from llamatailor.models.loading import load_saved_tokenizer
from llamatailor.rundir import RunDir
from llamatailor.ui.paths import OutsideRunsFolder, RunsFolder

SERVICE = __name__  # the key of the loaded models in `UiSettings.services`
DEFAULT_MAX_NEW_TOKENS = 256  # as `llamatailor chat`
MAX_NEW_TOKENS_LIMIT = 2048

Event = dict[str, Any]


@dataclass(frozen=True)
class ChatModel:
    """One column. `key`: "base", "tuned", or "gguf/<file name>"; `note`: where it comes from, and for a
    GGUF file its export gate result; `gguf`: the file (resolved inside the runs folder)."""

    key: str
    label: str
    note: str
    gguf: Path | None = None
    gates_passed: bool | None = None


def run_config(run: RunDir) -> RunConfig:
    """The run's resolved config.yaml, pointed at `run` wherever the folder now lies (config.yaml names the
    output_dir it was written in). Raises ConfigError when config.yaml is missing or invalid."""
    config = load_config(run.config)
    return config.model_copy(update={"output_dir": run.root.parent, "name": run.root.name})


def has_trained_model(config: RunConfig) -> bool:
    """Whether the run's final model (see module docstring) exists: a PEFT adapter or a full model."""
    final = config.run_dir.final(config.dpo.enabled)
    return (final / "adapter_config.json").is_file() or (final / "config.json").is_file()


def chat_models(runs: RunsFolder, name: str, config: RunConfig) -> list[ChatModel]:
    """The run's columns: base, tuned, then every GGUF file gguf/export_report.json lists that is in the
    run's gguf/ folder (a LoRA GGUF needs its base, so it is no column), labelled with its gate result."""
    final = config.run_dir.final(config.dpo.enabled).relative_to(config.run_dir.root)
    models = [
        ChatModel("base", "base", config.model.base),
        ChatModel("tuned", "tuned", f"{final}/"),
    ]
    report = _read_json(config.run_dir.gguf / "export_report.json")
    checks = report.get("files") if isinstance(report, dict) else None
    for check in checks if isinstance(checks, list) else []:
        file_name = Path(str(check.get("path", ""))).name
        try:
            path = runs.file(name, f"gguf/{file_name}")
        except OutsideRunsFolder:
            continue  # listed but deleted since, or a link leading out of the runs folder
        failures = [str(failure) for failure in check.get("failures") or []]
        note = "gates passed" if not failures else "gates failed: " + "; ".join(failures)
        label = f"GGUF {check.get('gguf_type', file_name)}"
        models.append(ChatModel(f"gguf/{file_name}", label, note, path, not failures))
    return models


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass
class LoadedModel:
    """A column's engine and prompter; `lock` lets one generation at a time use the engine."""

    engine: Engine
    prompter: Prompter
    lock: threading.Lock = field(default_factory=threading.Lock)


def load_model(config: RunConfig, model: ChatModel) -> LoadedModel:
    """The engine and prompter of one column (see the module docstring). Raises ModelLoadError (no trained
    model, no saved tokenizer, a GGUF file that cannot be read), or what transformers raises."""
    if not has_trained_model(config):  # base columns too: prompts use the tokenizer saved with it
        final = config.run_dir.final(config.dpo.enabled)
        raise ModelLoadError(f"{final}: no trained adapter or model here; run `llamatailor train` first")
    if model.gguf is None:
        session = ChatSession(config, use_base=model.key == "base")
        return LoadedModel(session.engine, session.prompter)
    from llamatailor.serve.target import DEFAULT_CONTEXT, trained_context

    chat = load_saved_tokenizer(config.run_dir.final(config.dpo.enabled), config.model)
    prompter = TokenizerPrompter(chat, config.data.system_prompt)
    try:
        context = min(DEFAULT_CONTEXT, trained_context(model.gguf))  # as `serve` runs a GGUF
        engine = LlamaCppEngine(model.label, model.gguf, context)
    except Exception as exc:  # the metadata reader and llama.cpp raise many kinds for a broken file
        raise ModelLoadError(f"gguf/{model.gguf.name}: cannot load it ({type(exc).__name__}: {exc})") from exc
    return LoadedModel(engine, prompter)


class LoadedModels:
    """The columns' engines, each loaded on first use and kept for the next prompt. Only one run's are kept
    (opening another run's chat, or the run's manifest changing, drops them), to bound memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run: tuple[Path, int] | None = None
        self._models: dict[str, LoadedModel] = {}

    def get(self, config: RunConfig, model: ChatModel) -> LoadedModel:
        """The loaded model of `model`'s column, loading it (one load at a time: the memory peak)."""
        with self._lock:
            run = config.run_dir
            key = (run.root, run.manifest.stat().st_mtime_ns)
            if self._run != key:
                self._run, self._models = key, {}
            if model.key not in self._models:
                self._models[model.key] = load_model(config, model)
            return self._models[model.key]

    def state(self, config: RunConfig) -> dict[str, Event]:
        """Per loaded column of this run: tokens its engine generated so far and whether it is generating."""
        with self._lock:
            if self._run is None or self._run[0] != config.run_dir.root:
                return {}
            return {
                key: {"tokens_generated": loaded.engine.tokens_generated, "busy": loaded.lock.locked()}
                for key, loaded in self._models.items()
            }


def answer_events(
    loaded: LoadedModels,
    config: RunConfig,
    models: list[ChatModel],
    prompt: str,
    max_new_tokens: int,
    cancelled: threading.Event,
) -> Iterator[Event]:
    """The answers of `models` to `prompt`, one model after another, as events (each names its column in
    `model`): "loading", "start" (prompt_tokens), "text" (a piece of answer), then "done" (finish_reason
    stop, length or cancelled; tokens; seconds) or "error" (message). Ends early once `cancelled` is set."""
    for model in models:
        if cancelled.is_set():
            return
        yield {"model": model.key, "event": "loading"}
        try:
            for event in _answer(loaded.get(config, model), prompt, max_new_tokens, cancelled):
                yield {"model": model.key, **event}
        except Exception as exc:  # shown in its column; the other columns go on
            message = str(exc) if isinstance(exc, LlamatailorError) else f"{type(exc).__name__}: {exc}"
            yield {"model": model.key, "event": "error", "message": message}


def _answer(
    model: LoadedModel, prompt: str, max_new_tokens: int, cancelled: threading.Event
) -> Iterator[Event]:
    ids = model.prompter.chat_ids([{"role": "user", "content": prompt}])
    if len(ids) + max_new_tokens > model.engine.context_length:
        raise LlamatailorError(
            f"the prompt's {len(ids)} tokens and {max_new_tokens} new tokens exceed the model's context of "
            f"{model.engine.context_length} tokens: shorten the prompt or lower max new tokens"
        )
    yield {"event": "start", "prompt_tokens": len(ids)}
    started, finish, tokens = time.perf_counter(), "length", 0
    with model.lock:
        for delta in stream_answer(
            model.engine, model.prompter, ids, GREEDY, max_new_tokens, cancelled=cancelled
        ):
            if delta.text:
                yield {"event": "text", "text": delta.text}
            if delta.finish_reason:
                finish, tokens = delta.finish_reason, delta.completion_tokens
    yield {
        "event": "done",
        "finish_reason": "cancelled" if cancelled.is_set() else finish,
        "tokens": tokens,
        "seconds": round(time.perf_counter() - started, 3),
    }


def trained_runs(runs: RunsFolder) -> list[Event]:
    """The /chat page's rows: every run with a trained model, its base, final model folder and GGUF count."""
    rows = []
    for name in runs.run_names():
        try:
            config = run_config(runs.run(name))
        except (LlamatailorError, OSError):
            continue  # no readable config.yaml: nothing to chat with
        if has_trained_model(config):
            models = chat_models(runs, name, config)
            final = config.run_dir.final(config.dpo.enabled).relative_to(config.run_dir.root)
            ggufs = [model for model in models if model.gguf is not None]
            rows.append({"name": name, "base": config.model.base, "final": f"{final}/", "ggufs": len(ggufs)})
    return rows
