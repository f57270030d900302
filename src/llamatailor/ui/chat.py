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

Each column's model loads on first use and stays loaded for the next prompt (`LoadedModels`) until the
page's Free memory, `idle_release_s` seconds without use, or another run's chat drops it; a model is never
dropped while it generates.
"""

import contextlib
import ctypes
import gc
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
DEFAULT_IDLE_RELEASE_S = 600.0  # models unused this long are dropped: the demo's columns hold about 2.5 GB

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
    """A column's engine and prompter; `lock` lets one generation at a time use the engine; `users`: the
    generations holding it now (changed under `LoadedModels`' lock), so it is never closed under them."""

    engine: Engine
    prompter: Prompter
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


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


class ModelsInUse(LlamatailorError):
    """Loaded models cannot be dropped: a generation is using them. `keys`: their columns."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(f"{', '.join(keys)} generating: stop it (or let it finish) before freeing memory")
        self.keys = keys


def free_memory() -> None:
    """Hands back what dropped models held: Python's reference cycles collected (a model's modules refer to
    each other, so refcounts alone leave them), torch's cached accelerator blocks emptied, and glibc's free
    heap trimmed (glibc keeps freed small blocks for reuse; trimming returns whole free pages to the OS)."""
    gc.collect()
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if torch.backends.mps.is_available():
        torch.mps.empty_cache()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, musl): that allocator returns memory by its own rules
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def close_engine(engine: Engine) -> None:
    """Frees what an engine holds outside Python's heap now: llama.cpp's model, context and KV cache
    (`Llama.close`); a transformers model has nothing to close (its tensors go with its last reference)."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()


class LoadedModels:
    """The columns' engines, each loaded on first use and kept for the next prompt. Only one run's are kept
    (opening another run's chat, or the run's manifest changing, drops them), to bound memory. They are
    dropped and their memory freed by `release` (the page's Free memory), and by a timer once none has
    been used for `idle_release_s` seconds (None: never); never while a generation uses them."""

    def __init__(self, idle_release_s: float | None = DEFAULT_IDLE_RELEASE_S) -> None:
        self.idle_release_s = idle_release_s
        self._lock = threading.Lock()
        self._run: tuple[Path, int] | None = None
        self._models: dict[str, LoadedModel] = {}
        self._timer: threading.Timer | None = None

    @contextlib.contextmanager
    def use(self, config: RunConfig, model: ChatModel) -> Iterator[LoadedModel]:
        """The loaded model of `model`'s column, loading it (one load at a time: the memory peak); it is
        not dropped until the block ends, and the idle timer starts again then."""
        with self._lock:
            run = config.run_dir
            key = (run.root, run.manifest.stat().st_mtime_ns)
            if self._run != key:
                self._drop()
                self._run = key
            if model.key not in self._models:
                self._models[model.key] = load_model(config, model)
            loaded = self._models[model.key]
            loaded.users += 1
        try:
            yield loaded
        finally:
            with self._lock:
                loaded.users -= 1
                self._arm(self.idle_release_s)  # the idle time counts from the last use's end

    def release(self, run: Path | None = None) -> list[str]:
        """Drops the loaded models (only when they are run folder `run`'s, if given) and frees their
        memory; the columns dropped. Raises ModelsInUse, dropping none, while a generation uses any."""
        with self._lock:
            if run is not None and (self._run is None or self._run[0] != run):
                return []
            busy = [key for key, loaded in self._models.items() if loaded.users]
            if busy:
                raise ModelsInUse(busy)
            return self._drop()

    def state(self, config: RunConfig) -> dict[str, Event]:
        """Per loaded column of this run: tokens its engine generated so far and whether a generation uses
        it now (`busy`)."""
        with self._lock:
            if self._run is None or self._run[0] != config.run_dir.root:
                return {}
            return {
                key: {"tokens_generated": loaded.engine.tokens_generated, "busy": loaded.users > 0}
                for key, loaded in self._models.items()
            }

    def _drop(self) -> list[str]:
        """Under `_lock`: forgets every model, closing those no generation holds (one still in use, after
        another run was opened, goes when its generation lets go of it), then frees the memory."""
        if self._timer is not None:
            self._timer.cancel()
        dropped, self._models, self._run = self._models, {}, None
        keys = list(dropped)
        for key in keys:
            if not dropped[key].users:
                close_engine(dropped[key].engine)
        dropped.clear()  # the last references: free_memory then collects what they held
        if keys:
            free_memory()
        return keys

    def _arm(self, delay: float | None) -> None:
        """Under `_lock`: (re)starts the idle timer, to fire in `delay` seconds."""
        if delay is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(delay, self._on_idle)
        self._timer.daemon = True  # a sleeping timer must not keep the process alive at exit
        self._timer.start()

    def _on_idle(self) -> None:
        with self._lock:
            if any(loaded.users for loaded in self._models.values()):
                return  # a generation is on: its end starts the timer again
            self._drop()


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
            with loaded.use(config, model) as used:
                for event in _answer(used, prompt, max_new_tokens, cancelled):
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
