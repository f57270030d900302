"""The chat pages: /chat (the runs with a trained model) and /runs/{name}/chat (one prompt answered side by
side, see `ui.chat`), and the routes behind them: the columns' state, the answers as NDJSON lines
streamed while the models generate, and freeing the memory the loaded models hold."""

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.responses import Response

from llamatailor.errors import LlamatailorError
from llamatailor.ui.chat import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_NEW_TOKENS_LIMIT,
    SERVICE,
    ChatModel,
    Event,
    LoadedModels,
    ModelsInUse,
    answer_events,
    chat_models,
    has_trained_model,
    run_config,
    trained_runs,
)
from llamatailor.ui.pages import render
from llamatailor.ui.settings import runs_of, settings_of

router = APIRouter()
_DONE = object()


class ChatRequest(BaseModel):
    """A prompt for the run's columns `models` (their keys; none given: every column)."""

    prompt: Annotated[str, Field(min_length=1, max_length=100_000)]
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS_LIMIT)] = DEFAULT_MAX_NEW_TOKENS
    models: list[str] | None = None


@router.get("/chat", response_class=HTMLResponse)
def chat_runs_page(request: Request) -> HTMLResponse:
    """The runs that have a trained model, each linking to its chat page."""
    return render(request, "chat.html", name=None, runs=trained_runs(runs_of(request)))


@router.get("/runs/{name}/chat", response_class=HTMLResponse)
def chat_page(request: Request, name: str) -> HTMLResponse:
    """The run's columns (base, tuned, each GGUF with its gate result), a prompt box and max new tokens;
    a run without a readable config or a trained model says so."""
    run = runs_of(request).run(name)
    context: dict[str, Any] = {"models": [], "system_prompt": None, "trained": False, "problem": None}
    try:
        config = run_config(run)
    except LlamatailorError as exc:
        context["problem"] = str(exc)
    else:
        context.update(
            models=chat_models(runs_of(request), name, config),
            system_prompt=config.data.system_prompt,
            trained=has_trained_model(config),
        )
    return render(
        request,
        "chat.html",
        name=name,
        section="chat",
        default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
        max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT,
        **context,
    )


def loaded_models(request: Request) -> LoadedModels:
    """The app's loaded chat models, created on first use."""
    services = settings_of(request).services
    if SERVICE not in services:
        services[SERVICE] = LoadedModels()
    loaded = services[SERVICE]
    assert isinstance(loaded, LoadedModels)
    return loaded


@router.get("/api/runs/{name}/chat")
def chat_state(request: Request, name: str) -> dict[str, Any]:
    """The run's columns: key, label, note, gate result, and for a loaded one the tokens its engine has
    generated and whether it is generating now."""
    config = run_config(runs_of(request).run(name))
    state = loaded_models(request).state(config)
    return {
        "models": [
            {
                "key": model.key,
                "label": model.label,
                "note": model.note,
                "gates_passed": model.gates_passed,
                "loaded": model.key in state,
                **state.get(model.key, {}),
            }
            for model in chat_models(runs_of(request), name, config)
        ]
    }


@router.post("/api/runs/{name}/chat")
def chat_answers(request: Request, name: str, body: ChatRequest) -> Response:
    """The columns' answers to `body.prompt` as NDJSON, one `ui.chat.answer_events` event a line, sent as
    the tokens come; 400 for an unknown column, a run without a readable config. A client that leaves stops
    the generation before its next token."""
    runs = runs_of(request)
    try:
        config = run_config(runs.run(name))
    except LlamatailorError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=400)
    models = chat_models(runs, name, config)
    chosen: list[ChatModel] = models
    if body.models is not None:
        known = {model.key for model in models}
        unknown = [key for key in body.models if key not in known]
        if unknown:
            return JSONResponse({"detail": f"run {name!r} has no model {unknown[0]!r}"}, status_code=400)
        chosen = [model for model in models if model.key in body.models]
    loaded = loaded_models(request)

    def events(cancelled: threading.Event) -> Iterator[Event]:
        return answer_events(loaded, config, chosen, body.prompt, body.max_new_tokens, cancelled)

    return StreamingResponse(ndjson_lines(events), media_type="application/x-ndjson")


@router.post("/api/runs/{name}/chat/free")
def chat_free(request: Request, name: str) -> JSONResponse:
    """Drops the run's loaded models and frees their memory: `released`, the columns dropped (none when
    none of this run's is loaded); 409 while a column generates (its engine is in use)."""
    run = runs_of(request).run(name)
    try:
        released = loaded_models(request).release(run.root)
    except ModelsInUse as exc:
        return JSONResponse({"detail": str(exc), "busy": exc.keys}, status_code=409)
    return JSONResponse({"released": released})


async def ndjson_lines(events: Any) -> AsyncIterator[bytes]:
    """`events(cancelled)` run in a worker thread (generation blocks), each event a JSON line as it comes.
    Closing this iterator (the client left: Starlette cancels the response) sets `cancelled`."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    cancelled = threading.Event()

    def work() -> None:
        try:
            for event in events(cancelled):
                loop.call_soon_threadsafe(queue.put_nowait, event)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    threading.Thread(target=work, daemon=True, name="llamatailor-ui-chat").start()
    try:
        while (item := await queue.get()) is not _DONE:
            yield (json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8")
    finally:
        cancelled.set()
