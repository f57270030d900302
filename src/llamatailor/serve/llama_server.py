"""llama.cpp's own `llama-server` as a backend: a GGUF file (and LoRA GGUF adapters) served with parallel slots
and continuous batching, in its own process on 127.0.0.1, behind llamatailor's API.

The binary is built from the same pinned llama.cpp as llama-cpp-python (scripts/install_llama_server.sh).
Requests go to its native `/completion` route with the prompt as token ids (rendered by the run's training
tokenizer, so no template runs twice), always streamed so that a client who leaves closes the connection and
llama.cpp frees the slot. Sampling is set to OpenAI's meaning: llama.cpp's own extras (top-k 40, min-p 0.05,
repeat penalty) are turned off, so temperature, top_p, penalties, logit_bias and seed mean what they say.
"""

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx

from llamatailor.data.formats import Message
from llamatailor.errors import ConfigError
from llamatailor.generation.prompts import Prompter
from llamatailor.generation.text import Delta, TokenLogprob
from llamatailor.hardware import usable_cpus
from llamatailor.serve.backend import (
    SAMPLING_FIELDS,
    Job,
    UpstreamError,
    free_port,
    upstream_message,
)
from llamatailor.serve.engine_process import EngineProcess

log = logging.getLogger(__name__)
BINARY_ENV = "LLAMATAILOR_LLAMA_SERVER"
START_TIMEOUT_S = 120
# llama.cpp's stop types: an end-of-generation token or a stop string end the answer, the budget cuts it.
FINISH = {"eos": "stop", "word": "stop", "limit": "length"}
# What the final chunk carries back (the rest, its settings and timings, is kilobytes per request).
RESPONSE_FIELDS = ["index", "content", "stop", "stop_type", "tokens_predicted", "completion_probabilities"]
# llama.cpp samplers that OpenAI's API does not have, at their off values.
OPENAI_SAMPLING = {"top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "xtc_probability": 0.0}


def find_binary() -> Path:
    """The llama-server to run: $LLAMATAILOR_LLAMA_SERVER, else the one `make setup` links into this
    environment's bin/, else one on PATH. Raises ConfigError saying how to get one."""
    named = os.environ.get(BINARY_ENV)
    if named:
        if not Path(named).is_file():
            raise ConfigError(f"{BINARY_ENV}={named}: no such file")
        return Path(named)
    beside = Path(sys.prefix) / "bin" / "llama-server"
    found = beside if beside.is_file() else shutil.which("llama-server")
    if found is None:
        raise ConfigError(
            "llama-server not found: `make setup` builds it (scripts/install_llama_server.sh), or set "
            f"{BINARY_ENV} to a llama-server built from llama.cpp; `--engine transformers` needs none"
        )
    return Path(found)


def default_slots() -> int:
    """Parallel slots when not given: one per CPU this process may use, at least 4 (on a CPU, decoding 4
    sequences in one batch costs little more than one; a GPU build is worth more, `--slots`)."""
    return max(4, usable_cpus())


def server_command(
    binary: Path, gguf: Path, port: int, context: int, slots: int, threads: int, loras: list[Path]
) -> list[str]:
    """Each slot gets `context` tokens of KV cache (llama.cpp splits -c over the slots)."""
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    command += ["-c", str(context * slots), "-np", str(slots), "--no-kv-unified", "--cont-batching"]
    command += ["-t", str(threads), "-tb", str(threads), "--metrics", "--no-webui"]
    for lora in loras:
        command += ["--lora", str(lora)]
    if loras:
        command.append("--lora-init-without-apply")  # each request says which adapter applies
    return command


class LlamaServerBackend:
    """`adapters` maps each model name to the index of its LoRA GGUF in `loras` (None: the base alone);
    `vocab_size`: the GGUF's token count (llama.cpp's n_vocab)."""

    honours = frozenset(SAMPLING_FIELDS)

    def __init__(
        self,
        gguf: Path,
        prompter: Prompter,
        adapters: dict[str, int | None],
        loras: list[Path],
        context: int,
        slots: int,
        threads: int,
        vocab_size: int,
    ) -> None:
        self.prompter, self.adapters, self.loras = prompter, adapters, loras
        self.context_length, self.slots, self.vocab_size = context, slots, vocab_size
        self.description = f"llama-server over {gguf.name}, {slots} slot{'s' if slots > 1 else ''}" + (
            f", adapters {', '.join(n for n, i in adapters.items() if i is not None)}" if loras else ""
        )
        port = free_port()
        command = server_command(find_binary(), gguf, port, context, slots, threads, loras)
        folder = Path(tempfile.mkdtemp(prefix="llamatailor-llama-server-"))
        self.process = EngineProcess("llama-server", command, port, folder, START_TIMEOUT_S)
        self.url = self.process.url
        # A new connection per request: llama-server closes each one after a streamed answer without saying
        # so (no `Connection: close`), and a pooled connection it had closed failed ~1 answer in 50-200.
        self.client = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(None, connect=10),
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    @property
    def tokens_generated(self) -> int:
        """llama.cpp's own count of generated tokens (its /metrics), a cancelled generation's included once
        its slot is freed."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("llamacpp:tokens_predicted_total"):
                return int(float(line.split()[-1]))
        return 0

    def model_ids(self) -> list[str]:
        return list(self.adapters)

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        return self.prompter.chat_ids(messages)

    def text_prompt(self, text: str) -> list[int]:
        return self.prompter.text_ids(text)

    def request_body(self, job: Job) -> dict[str, Any]:
        """The native /completion body for `job` (llama.cpp's tools/server/README.md)."""
        body: dict[str, Any] = {
            "prompt": job.prompt,
            "n_predict": job.max_tokens,
            "stream": True,
            "cache_prompt": True,
            "temperature": job.temperature,
            "top_p": job.top_p,
            "seed": -1 if job.seed is None else job.seed % 2**32,
            "stop": job.stop_strings,
            "n_cmpl": job.n,
            "presence_penalty": job.presence_penalty,
            "frequency_penalty": job.frequency_penalty,
            "logit_bias": [[token, bias] for token, bias in job.logit_bias.items()],
            "response_fields": RESPONSE_FIELDS,
            **OPENAI_SAMPLING,
        }
        if job.top_logprobs is not None:  # the chosen token's log-probability comes with n_probs >= 1
            body["n_probs"] = max(job.top_logprobs, 1)
        if job.json_schema is not None:
            body["json_schema"] = job.json_schema
        if self.loras:
            chosen = self.adapters[job.model]
            body["lora"] = [{"id": i, "scale": 1.0 if i == chosen else 0.0} for i in range(len(self.loras))]
        return body

    async def answer(self, job: Job) -> AsyncIterator[Delta]:
        """Deltas as llama.cpp streams them; closing this iterator closes the connection, which cancels the
        generation in its slot. Raises UpstreamError with llama.cpp's message when it refuses the request."""
        async with self.client.stream("POST", "/completion", json=self.request_body(job)) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", errors="replace")
                raise UpstreamError(response.status_code, upstream_message(detail))
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    yield delta_of(json.loads(line[6:]), job.top_logprobs)

    def close(self) -> None:
        self.process.stop(timeout_s=10)


def delta_of(chunk: dict[str, Any], top_logprobs: int | None) -> Delta:
    """One streamed /completion chunk as a Delta. Raises UpstreamError for an error chunk."""
    if "error" in chunk:
        raise UpstreamError(500, upstream_message(json.dumps(chunk)))
    finish = FINISH.get(chunk.get("stop_type", ""), "length") if chunk.get("stop") else None
    logprobs = [token_logprob(item, top_logprobs or 0) for item in chunk.get("completion_probabilities", [])]
    return Delta(
        chunk.get("content", ""),
        finish,
        int(chunk.get("tokens_predicted", 0)) if finish else 0,
        int(chunk.get("index", 0)),
        logprobs if top_logprobs is not None else [],
    )


def token_logprob(item: dict[str, Any], top: int) -> TokenLogprob:
    alternatives = [(t["token"], float(t["logprob"]), list(t["bytes"])) for t in item.get("top_logprobs", [])]
    return TokenLogprob(item["token"], float(item["logprob"]), list(item["bytes"]), alternatives[:top])
