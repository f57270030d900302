"""What the HTTP API asks of whatever generates: a `Backend` takes a `Job` (prompt ids already rendered by the
run's training tokenizer, the request's sampling) and streams `Delta`s, each tagged with its choice index.

Three kinds: an engine in this process (transformers; one generation at a time), llama.cpp's own
`llama-server` (parallel slots, continuous batching) and vLLM's OpenAI server (GPUs), both in their own
process. The API keeps the key, limits, queue, logs and metrics in front of each; a backend says which
request fields beyond the basics (model, prompt, max_tokens, temperature, top_p, seed, stop) it applies, and
the API refuses the others with 400 unless their value changes nothing.
"""

import ipaddress
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from llamatailor.data.formats import Message
from llamatailor.errors import ConfigError
from llamatailor.generation.text import Delta

# The request fields a backend may apply besides the basics; the names are OpenAI's.
SAMPLING_FIELDS = (
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "response_format",
)


@dataclass(frozen=True)
class Job:
    """One request's generation. `prompt`: token ids; `max_tokens`: per choice; `top_logprobs`: None for no
    log-probabilities, k >= 0 for each generated token's log-probability (nats) and its k most likely
    alternatives; `json_schema`: None for free text, else a JSON schema the answer must match; `logit_bias`: token id -> bias added to its logit (-100 bans it)."""

    model: str
    prompt: list[int]
    max_tokens: int
    stop_strings: list[str]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    top_logprobs: int | None = None
    json_schema: dict[str, Any] | None = None


class Backend(Protocol):
    """`slots`: generations run at once (the API queues the rest); `honours`: the SAMPLING_FIELDS it applies;
    `vocab_size`: the served model's token ids are 0 to vocab_size - 1 (the rows of its logits);
    `tokens_generated`: tokens generated since start, a cancelled generation's included (metrics)."""

    description: str
    context_length: int
    vocab_size: int
    slots: int
    honours: frozenset[str]

    @property
    def tokens_generated(self) -> int: ...

    def model_ids(self) -> list[str]: ...

    def chat_prompt(self, messages: list[Message]) -> list[int]: ...

    def text_prompt(self, text: str) -> list[int]: ...

    def answer(self, job: Job) -> AsyncIterator[Delta]:
        """The answer's deltas, choice by choice interleaved; each choice's last delta carries its finish
        reason ("stop" or "length") and its token count. Closing the iterator cancels the generation."""
        ...

    def close(self) -> None: ...


class UpstreamError(Exception):
    """An engine in its own process (llama-server, vLLM) refused a request: its HTTP status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def upstream_message(detail: str) -> str:
    try:
        return str(json.loads(detail)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return detail[:500]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name, IPv6 with or without brackets) is this machine only: `localhost`
    or a loopback address (all of 127.0.0.0/8, ::1). The one rule for where `serve` and `ui` may bind without
    a key, and for which Host headers `ui` then answers."""
    name = host.strip().removeprefix("[").removesuffix("]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is 127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def check_port_free(host: str, port: int) -> None:
    """Raises ConfigError naming the address when `host`:`port` cannot be bound (another server has it), so
    that `serve` stops before its engine spends minutes starting. Bound as uvicorn binds it (IPv6 for an
    address with a colon, SO_REUSEADDR: a port in TIME_WAIT is free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--port {port}: cannot listen on {address} ({exc.strerror or exc}); another server may have it: "
            "stop it or choose another --port"
        ) from None
