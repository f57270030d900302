"""The HTTP API: OpenAI's routes over the served models, with limits that keep it up under load and bad requests.

* API key: with one set, every /v1 route needs `Authorization: Bearer <key>` (401 otherwise).
* Body size cap (413, chunked bodies counted as they arrive), prompt + max_tokens checked against the
  context (400), a bounded queue (429 with Retry-After when full), unknown models (404); every error is
  OpenAI-shaped JSON.
* A client that disconnects cancels its generation as soon as the server hears of it: a streaming
  response through Starlette's disconnect listener, a non-streaming one through `until_disconnected`.
"""

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from jinja2 import TemplateError, TemplateSyntaxError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamatailor.data.templating import RenderError
from llamatailor.generation.text import Delta
from llamatailor.serve.backend import Backend, Job, UpstreamError
from llamatailor.serve.metrics import ServerMetrics
from llamatailor.serve.protocol import (
    ERROR_TYPES,
    UNSUPPORTED,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
)
from llamatailor.serve.request_log import RequestLog
from llamatailor.serve.responses import Choice, ResponseShape
from llamatailor.serve.scheduler import QueueFull, Scheduler

ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics")


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_queue: int = 16
    max_tokens_limit: int | None = None  # cap on one request's max_tokens; default: the context
    retry_after_s: int = 1
    request_log: Path | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 429 else None
    body = error_body(message, ERROR_TYPES.get(status, "server_error"), param, code)
    return JSONResponse(body, status_code=status, headers=headers)


class Guard:
    """ASGI middleware: body size cap, API key, and request metrics, before FastAPI parses anything."""

    def __init__(self, app: ASGIApp, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES else "other"
        started = time.perf_counter()
        status = {"code": 500}

        async def send_recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_recording)
                return
            await self.app(scope, self._capped(receive), send_recording)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.settings.api_key
        if key and scope["path"].startswith("/v1") and headers.get("authorization", "") != f"Bearer {key}":
            return error_response(
                401, "missing or wrong API key (Authorization: Bearer <key>)", code="invalid_api_key"
            )
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.settings.max_body_bytes:
            return error_response(413, f"request body over {self.settings.max_body_bytes} bytes")
        return None

    def _capped(self, receive: Receive) -> Receive:
        """Chunked bodies carry no length: count as they arrive. FastAPI turns an error while it reads the
        body into 400, except an HTTPException, which it passes on (to `http_error`: 413)."""
        seen = 0
        limit = self.settings.max_body_bytes

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body over {limit} bytes")
            return message

        return capped


def create_app(served: Backend, settings: ServerSettings) -> FastAPI:
    scheduler = Scheduler(served, settings.max_queue)
    after_cancel = getattr(served, "tokens_after_cancel", None)  # measured by one-slot engines only
    metrics = ServerMetrics(
        lambda: scheduler.depth,
        lambda: served.tokens_generated,
        lambda: scheduler.cancelled,
        (lambda: served.tokens_after_cancel) if after_cancel is not None else None,  # type: ignore[attr-defined]
    )
    log = RequestLog(settings.request_log) if settings.request_log else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        served.close()  # here, not after uvicorn returns: uvicorn ends by re-raising the SIGTERM it caught

    app = FastAPI(title="llamatailor", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    register_errors(app)
    service = Service(served, scheduler, metrics, settings, log)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": served.model_ids(), "queue_depth": scheduler.depth}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        # in a thread: llama.cpp's counters are read over HTTP, which must not stall the streams on this loop
        text = await asyncio.to_thread(generate_latest, metrics.registry)
        return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "llamatailor"}
            for m in served.model_ids()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        service.check_model(body.model)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        prompt = chat_prompt(served, messages)
        return await service.respond(request, body, prompt, chat=True, logged_input=messages)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        service.check_model(body.model)
        prompt = served.text_prompt(body.prompt)
        return await service.respond(request, body, prompt, chat=False, logged_input=body.prompt)

    return Guard(app, settings, metrics)  # type: ignore[return-value]


def chat_prompt(served: Backend, messages: list[dict[str, Any]]) -> list[int]:
    """The prompt ids of a chat request; a conversation the chat template refuses (its raise_exception, e.g.
    roles that do not alternate) or cannot render safely is the client's error, a 400 in the template's
    words. A template with a syntax error is the server's, left to the 500 handler."""
    try:
        return served.chat_prompt(messages)
    except TemplateSyntaxError:
        raise
    except TemplateError as exc:
        raise ApiError(
            400, f"messages: the chat template refuses this conversation: {exc}", "messages"
        ) from None
    except RenderError as exc:
        raise ApiError(400, f"messages: {exc}", "messages") from None


def register_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":  # its location is a character offset, not a field
            return error_response(400, f"invalid JSON body: {first['ctx']['error']}")
        location = ".".join(str(part) for part in first["loc"] if part != "body")
        message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        if first["type"] == "extra_forbidden":
            message = f"unsupported field {location!r}"
        code = UNSUPPORTED if first["type"] == UNSUPPORTED else None
        return error_response(400, f"{location}: {message}" if location else message, location or None, code)

    @app.exception_handler(UpstreamError)
    async def upstream(request: Request, exc: UpstreamError) -> JSONResponse:
        status = exc.status if 400 <= exc.status < 500 else 500
        return error_response(status, f"the engine refused the request: {exc.message}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


class Service:
    """Turns one validated request into a job, and its deltas into OpenAI's response or SSE chunks."""

    def __init__(
        self,
        backend: Backend,
        scheduler: Scheduler,
        metrics: ServerMetrics,
        settings: ServerSettings,
        log: RequestLog | None,
    ) -> None:
        self.backend, self.scheduler, self.metrics, self.settings, self.log = (
            backend,
            scheduler,
            metrics,
            settings,
            log,
        )

    def check_model(self, model: str) -> None:
        if model not in self.backend.model_ids():
            raise ApiError(
                404,
                f"model {model!r} does not exist; models: {', '.join(self.backend.model_ids())}",
                "model",
                "model_not_found",
            )

    def budget(self, body: ChatCompletionRequest | CompletionRequest, prompt: list[int]) -> int:
        """Tokens each choice may generate. Raises ApiError (400) when the prompt and max_tokens do not fit."""
        context = self.backend.context_length
        requested = body.token_budget()
        if len(prompt) >= context:
            raise ApiError(
                400,
                f"the prompt has {len(prompt)} tokens; this model's context is {context}",
                "messages",
                "context_length_exceeded",
            )
        limit = self.settings.max_tokens_limit
        if requested is not None and limit is not None and requested > limit:
            raise ApiError(
                400, f"max_tokens {requested} is over this server's limit of {limit}", "max_tokens"
            )
        if requested is not None and len(prompt) + requested > context:
            raise ApiError(
                400,
                f"this model's context is {context} tokens; the prompt has {len(prompt)} and max_tokens asks "
                f"for {requested} more",
                "max_tokens",
                "context_length_exceeded",
            )
        return requested or min(context - len(prompt), limit or context)

    def job(self, body: ChatCompletionRequest | CompletionRequest, prompt: list[int]) -> Job:
        refuse_unhonoured(body, self.backend)
        logit_bias = {int(token): bias for token, bias in body.logit_bias.items()}
        refuse_unknown_tokens(logit_bias, self.backend.vocab_size)
        if body.n > self.backend.slots:  # llama.cpp decodes a request's choices in parallel slots
            raise ApiError(
                400, f"n: at most {self.backend.slots} choices per request on this server (its slots)", "n"
            )
        return Job(
            body.model,
            prompt,
            self.budget(body, prompt),
            body.stop_sequences(),
            body.temperature,
            body.top_p,
            body.seed,
            body.n,
            body.presence_penalty or 0.0,
            body.frequency_penalty or 0.0,
            logit_bias,
            body.logprobs_asked(),
            body.json_schema(),
        )

    async def respond(
        self,
        request: Request,
        body: ChatCompletionRequest | CompletionRequest,
        prompt: list[int],
        chat: bool,
        logged_input: Any,
    ) -> Any:
        job = self.job(body, prompt)
        if self.scheduler.waiting >= self.scheduler.max_queue:
            return error_response(429, f"the queue is full ({self.scheduler.max_queue} waiting); retry later")
        shape = ResponseShape(chat, body.model, len(prompt), job.top_logprobs)
        deltas = self.timed(self.scheduler.run(job))
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self.sse(shape, deltas, job.n, usage, logged_input), media_type="text/event-stream"
            )
        try:
            choices = await self.collect(request, deltas, job.n)
        except QueueFull:
            return error_response(429, f"the queue is full ({self.scheduler.max_queue} waiting); retry later")
        self.record(shape, logged_input, choices)
        return shape.full(choices)

    async def timed(self, deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
        started = time.perf_counter()
        first: float | None = None
        try:
            async for delta in deltas:
                if first is None and (delta.text or delta.finish_reason):
                    first = time.perf_counter()
                    self.metrics.first_token.observe(first - started)
                if delta.finish_reason:
                    elapsed = time.perf_counter() - (first or started)
                    if delta.completion_tokens > 1 and elapsed > 0:
                        self.metrics.speed.observe((delta.completion_tokens - 1) / elapsed)
                yield delta
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]

    async def collect(self, request: Request, deltas: AsyncIterator[Delta], n: int) -> list[Choice]:
        choices = [Choice() for _ in range(n)]

        async def consume() -> None:
            async for delta in deltas:
                choices[delta.index].add(delta)

        task = asyncio.create_task(consume())
        gone = asyncio.create_task(until_disconnected(request))
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if gone in done and gone.exception() is None:  # the client left: stop before the next token
            task.cancel()
        gone.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
        if task.cancelled():
            raise ApiError(499, "client closed the request")
        task.result()
        return choices

    async def sse(
        self, shape: ResponseShape, deltas: AsyncIterator[Delta], n: int, usage: bool, logged_input: Any
    ) -> AsyncIterator[str]:
        choices = [Choice() for _ in range(n)]
        try:
            for index in range(n):
                yield event(shape.first_chunk(index))
            async for delta in deltas:
                offset = len(choices[delta.index].text)
                choices[delta.index].add(delta)
                if delta.text or delta.logprobs or delta.finish_reason:
                    yield event(shape.chunk(delta, offset))
            if usage:
                yield event(shape.usage_chunk(sum(choice.tokens for choice in choices)))
            self.record(shape, logged_input, choices)
        except QueueFull:
            yield event(error_body("the queue is full; retry later", "rate_limit_error"))
        except Exception as exc:  # the status is sent already: report in the stream, as OpenAI does
            yield event(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"))
        yield "data: [DONE]\n\n"

    def record(self, shape: ResponseShape, logged_input: Any, choices: list[Choice]) -> None:
        if self.log:
            for choice in choices:
                self.log.write(
                    shape.kind,
                    shape.model,
                    logged_input,
                    choice.text,
                    choice.finish_reason,
                    shape.prompt_tokens,
                    choice.tokens,
                )


def refuse_unhonoured(body: ChatCompletionRequest | CompletionRequest, backend: Backend) -> None:
    """Raises ApiError (400, "unsupported_value") naming the first field the backend would not apply, unless
    its value changes nothing (n 1, penalties 0, no logit_bias, no logprobs, a text response_format)."""
    values = {
        "n": body.n != 1,
        "presence_penalty": bool(body.presence_penalty),
        "frequency_penalty": bool(body.frequency_penalty),
        "logit_bias": bool(body.logit_bias),
        "logprobs": body.logprobs_asked() is not None,
        "response_format": body.json_schema() is not None,
    }
    for name, applied in values.items():
        if applied and name not in backend.honours:
            raise ApiError(
                400,
                f"{name}: not supported by this server's engine ({backend.description}); serve a GGUF file "
                "(llama-server) or use --engine vllm for it",
                name,
                UNSUPPORTED,
            )


def refuse_unknown_tokens(logit_bias: dict[int, float], vocab_size: int) -> None:
    """Raises ApiError (400, param "logit_bias") naming the lowest token id the model does not have. The
    engines disagree about such an id (llama.cpp skips it, vLLM answers 500): the API decides, alike for all."""
    outside = sorted(token for token in logit_bias if token >= vocab_size)
    if outside:
        raise ApiError(
            400,
            f"logit_bias: token id {outside[0]} is not in this model's vocabulary of {vocab_size} tokens "
            f"(ids 0 to {vocab_size - 1})",
            "logit_bias",
        )


async def until_disconnected(request: Request) -> None:
    """Returns when the client has gone away. The body is read already, so the server's next message is
    the disconnect; it arrives as soon as the connection closes (no polling between tokens)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
