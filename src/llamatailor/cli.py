"""The `llamatailor` command: parse arguments, load the run file, call one stage, print its result.

Stages are run and shown from their declarations (`stage_contract.Stage`): nothing here branches on a
stage's name. What loads torch, transformers or the config schema is imported inside the commands, so
that `llamatailor --help` and `--version` answer at once.
"""

import functools
import logging
import socket
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.status import Status

from llamatailor import __version__
from llamatailor.distributed import is_main_process
from llamatailor.errors import ConfigError, LlamatailorError
from llamatailor.vocabulary import LORA_TARGET_PRESETS, METHODS, OPTIMIZERS, SHARDINGS

if TYPE_CHECKING:
    from llamatailor.config import RunConfig
    from llamatailor.stage_contract import Stage

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Fine-tune a Llama-family model for one job: prepare -> train -> eval -> merge -> export.",
)
console = Console(quiet=not is_main_process())  # under torchrun, one process speaks
errors = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])
ConfigArg = Annotated[Path, typer.Argument(help="The run file (YAML), or a run directory.")]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Overrides such as train.learning_rate=1e-4 data.max_seq_len=512.")
]


def user_errors(command: F) -> F:
    """Print a LlamatailorError's message (no traceback) and exit non-zero: 2 for the config, else 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _setup_logging()
        try:
            return command(*args, **kwargs)
        except LlamatailorError as exc:
            errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2 if isinstance(exc, ConfigError) else 1) from None

    return wrapper  # type: ignore[return-value]


def _setup_logging() -> None:
    # Raised inside peft/TRL about their own use of a renamed transformers property; nothing a user can act on.
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning
    )
    # PEFT 0.21 checks rank_pattern keys against module names only; the per-expert rank of a Llama 4's fused
    # expert parameters is keyed by parameter name, and applied (tests/test_llama4.py checks the shapes).
    warnings.filterwarnings(
        "ignore", message=r"The following rank_pattern keys .*experts", category=RuntimeWarning
    )
    handler = RichHandler(console=errors, show_path=False, show_time=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("llamatailor").setLevel(logging.INFO)
    # bitsandbytes warns on CPU that an optional kernel package is missing; its slower path works.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _load(config: Path, overrides: list[str] | None) -> "RunConfig":
    from llamatailor.config import load_config

    return load_config(config, overrides or [])


def _stage(name: str) -> "Stage":
    from llamatailor.pipeline import STAGE_BY_NAME

    return STAGE_BY_NAME[name]


def _run_stage(stage: "Stage", config: "RunConfig", **options: Any) -> None:
    """Run one stage in this process, showing its progress, then print its result's view."""
    from llamatailor import views
    from llamatailor.pipeline import run_stage

    console.rule(f"[bold]{stage.name}[/] · run {config.name}")
    with StageDisplay(stage.activity) as display:
        if stage.reports_progress:
            options["progress"] = display
        result = run_stage(stage, config, **options)
    console.print(views.stage_view(result, config), crop=False)


def _train_stage(
    stage: "Stage", config_path: Path, overrides: list[str] | None, resume: bool, fresh: bool, nproc: int
) -> None:
    """Run a training stage here, or under torchrun in `nproc` processes (DDP) that this process waits for."""
    from llamatailor.distributed import world_size
    from llamatailor.train.launch import launch_distributed

    if resume and fresh:
        raise ConfigError(
            "--resume and --fresh exclude each other: --resume continues from the newest complete "
            "checkpoint, --fresh deletes this stage's checkpoints and starts over"
        )
    if nproc > 1 and world_size() == 1:
        console.rule(f"[bold]{stage.name}[/] · {nproc} processes (torchrun)")
        code = launch_distributed(stage.name, config_path, overrides or [], nproc, resume, fresh)
        if code:
            raise typer.Exit(code)
        return
    _run_stage(stage, _load(config_path, overrides), resume=resume, fresh=fresh)


class StageDisplay:
    """What a running stage shows, fed through the `stage_contract.Progress` protocol (a context manager).

    The stage's `activity`, then any message (a call without a count), is a spinner line. Counts replace
    it with bars: one bar per `what` where the total is known, else one running line whose label follows
    `what`. Where the console is not a terminal, the bars are printed once, as they end.
    """

    def __init__(self, activity: str | None) -> None:
        self.status: Status | None = console.status(activity) if activity else None
        self.bars: Progress | None = None
        self.tasks: dict[str | None, TaskID] = {}

    def __enter__(self) -> "StageDisplay":
        if self.status is not None:
            self.status.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for live in (self.status, self.bars):
            if live is not None:
                live.stop()

    def __call__(self, what: str, done: int | None = None, total: int | None = None) -> None:
        if done is None and self.bars is None:
            if self.status is None:
                self.status = console.status(what)
                self.status.start()
            self.status.update(what)
            return
        if self.bars is None:
            if self.status is not None:
                self.status.stop()
                self.status = None
            self.bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            )
            self.bars.start()
        key = what if total is not None else None
        if key not in self.tasks:
            self.tasks[key] = self.bars.add_task(what, total=total)
        self.bars.update(self.tasks[key], description=what, completed=done)


@app.command()
@user_errors
def prepare(config: ConfigArg, overrides: OverridesArg = None) -> None:
    """Read the data files, check and render every sample, split, and write data/ and its report."""
    _run_stage(_stage("prepare"), _load(config, overrides))


ResumeOption = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue from the newest complete checkpoint; it must have been written under the same settings "
        "(logging, evaluation, saving, tracking, threads, early stopping and gradient checkpointing may differ).",
    ),
]
FreshOption = Annotated[bool, typer.Option("--fresh", help="Delete this stage's checkpoints and start over.")]
NprocOption = Annotated[int, typer.Option("--nproc", min=1, help="Processes to train in (torchrun, DDP).")]


@app.command()
@user_errors
def train(
    config: ConfigArg,
    overrides: OverridesArg = None,
    resume: ResumeOption = False,
    fresh: FreshOption = False,
    nproc: NprocOption = 1,
) -> None:
    """Fine-tune (LoRA, QLoRA or full) on the prepared data; writes adapter/ (or model/), metrics.jsonl, loss.png.
    Where checkpoints/ already holds checkpoints, say --resume or --fresh."""
    _train_stage(_stage("train"), config, overrides, resume, fresh, nproc)


@app.command()
@user_errors
def dpo(
    config: ConfigArg,
    overrides: OverridesArg = None,
    resume: ResumeOption = False,
    fresh: FreshOption = False,
    nproc: NprocOption = 1,
) -> None:
    """Preference optimisation (DPO) continuing the SFT adapter; writes dpo/adapter/. Needs dpo.enabled.
    Where dpo/checkpoints/ already holds checkpoints, say --resume or --fresh."""
    if not _load(config, overrides).dpo.enabled:
        raise ConfigError(f"{config}: dpo.enabled is false; set it (or pass dpo.enabled=true) to run DPO")
    _train_stage(_stage("dpo"), config, overrides, resume, fresh, nproc)


@app.command(name="eval")
@user_errors
def evaluate(
    config: ConfigArg,
    overrides: OverridesArg = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Evaluate this merged folder or .gguf file instead of the tuned model."),
    ] = None,
) -> None:
    """Answer the held-out test prompts with the base and the tuned model; metrics, perplexity, probes."""
    loaded = _load(config, overrides)
    if model is None:
        _run_stage(_stage("eval"), loaded)
        return
    from llamatailor import views
    from llamatailor.evaluate.stage import evaluate_run

    if not model.exists():
        raise ConfigError(f"--model {model}: no such file or folder")
    loaded.create_run_dir()  # its results go to eval/candidates/: refuse now, not after answering
    console.rule(f"[bold]eval[/] · {model.name} against the base")
    with StageDisplay(None) as display:
        result = evaluate_run(loaded, display, model_path=model)
    console.print(views.stage_view(result, loaded), crop=False)


@app.command()
@user_errors
def merge(config: ConfigArg, overrides: OverridesArg = None) -> None:
    """Fold the adapter into a full-precision base (merged/), proven equal to the adapter model."""
    _run_stage(_stage("merge"), _load(config, overrides))


@app.command()
@user_errors
def export(config: ConfigArg, overrides: OverridesArg = None) -> None:
    """GGUF files of the merged model (export.gguf), each checked by llama.cpp; an Ollama Modelfile."""
    loaded = _load(config, overrides)
    if not loaded.export.gguf:
        raise ConfigError(f"{config}: export.gguf is empty; name the types to write, e.g. export.gguf=[q8_0]")
    _run_stage(_stage("export"), loaded)


@app.command()
@user_errors
def run(
    config: ConfigArg,
    overrides: OverridesArg = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Run every stage, even those up to date (training still resumes; see --fresh)."
        ),
    ] = False,
    fresh: Annotated[
        bool,
        typer.Option("--fresh", help="Training stages that run delete their checkpoints and start over."),
    ] = False,
    nproc: NprocOption = 1,
) -> None:
    """Run all stages in order, skipping those whose outputs are complete for this config and inputs.
    A training stage that runs resumes from its newest complete checkpoint (and stops, deleting nothing,
    if that was written under other settings); with --fresh it deletes its checkpoints and starts over."""
    from llamatailor import views
    from llamatailor.pipeline import STAGES

    loaded = _load(config, overrides)
    planned = _plan(loaded, STAGES, force)
    for index, stage in enumerate(STAGES):
        if not stage.enabled(loaded):
            console.print(f"[dim]{stage.name}: off in this run file, skipped[/]")
        elif stage not in planned:
            console.print(f"[dim]{stage.name}: up to date for this config and inputs, skipped[/]")
            if stage.load_result is not None:
                console.print(views.stage_view(stage.load_result(loaded), loaded), crop=False)
        else:
            if stage.trains:
                _train_stage(stage, config, overrides, resume=not fresh, fresh=fresh, nproc=nproc)
            else:
                _run_stage(stage, loaded)
            # What it wrote is on disk now: the later stages are weighed again against it.
            planned = _plan(loaded, STAGES[index + 1 :], force)


def _plan(config: "RunConfig", stages: Sequence["Stage"], force: bool) -> list["Stage"]:
    """The stages `run` runs: with --force every enabled one, else `pipeline.stages_to_run`."""
    from llamatailor.pipeline import stages_to_run

    return [stage for stage in stages if stage.enabled(config)] if force else stages_to_run(config, stages)


# The planner's Mixture-of-Experts and serving options (`plan`).
ExpertBitsOption = Annotated[
    int | None,
    typer.Option(
        help="QLoRA's routed experts (Llama 4) at 4 or 8 bits. llamatailor's own QLoRA keeps them in bf16 "
        "(bitsandbytes quantizes nn.Linear only; the experts are fused 3-D tensors), which is the default; "
        "this plans what Axolotl's linearized, quantized experts would need."
    ),
]
ExpertRankOption = Annotated[
    int | None,
    typer.Option(help="LoRA rank per routed expert (--lora-targets experts); default r // experts."),
]
InferenceContextOption = Annotated[
    int | None,
    typer.Option(help="Tokens of KV cache for the inference rows (one sequence); default 8192."),
]


@app.command()
@user_errors
def plan(
    config: Annotated[Path | None, typer.Argument(help="A run file to plan for (optional).")] = None,
    overrides: OverridesArg = None,
    model: Annotated[
        str | None, typer.Option(help="A preset (see docs/plan.md), a model folder or a cached hub id.")
    ] = None,
    method: Annotated[str | None, typer.Option(help=f"{', '.join(METHODS)}.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    micro_batch: Annotated[int | None, typer.Option(help="Sequences per device per step.")] = None,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step (no extra memory).")] = 1,
    checkpointing: Annotated[bool | None, typer.Option("--checkpointing/--no-checkpointing")] = None,
    optimizer: Annotated[str | None, typer.Option(help=f"{', '.join(OPTIMIZERS)}.")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank.")] = None,
    lora_targets: Annotated[
        str | None, typer.Option(help=f"{', '.join(LORA_TARGET_PRESETS)}, or comma-separated module names.")
    ] = None,
    bits: Annotated[int | None, typer.Option(help="QLoRA base bits: 4 or 8.")] = None,
    expert_bits: ExpertBitsOption = None,
    expert_r: ExpertRankOption = None,
    inference_context: InferenceContextOption = None,
    gpus: Annotated[int, typer.Option(help="Devices.")] = 1,
    sharding: Annotated[str, typer.Option(help=f"{', '.join(SHARDINGS)}.")] = "none",
    gpu_mem: Annotated[
        float | None, typer.Option(help="GiB per GPU; default: the GPU here, else this CPU's free RAM.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Which method fits this GPU for this model and shapes, with the peak memory term by term, and what
    serving it takes at 4, 8 and 16 bits."""
    import json

    from llamatailor import views
    from llamatailor.plan.options import build_plan

    loaded = _load(config, overrides) if config is not None else None
    result = build_plan(
        loaded,
        model=model,
        method=method,
        seq_len=seq_len,
        micro_batch=micro_batch,
        checkpointing=checkpointing,
        optimizer=optimizer,
        lora_r=lora_r,
        lora_targets=lora_targets,
        bits=bits,
        expert_bits=expert_bits,
        expert_r=expert_r,
        inference_context=inference_context,
        gpus=gpus,
        sharding=sharding,
        gpu_mem_gib=gpu_mem,
    )
    if json_output:
        from llamatailor.plan.verdict import plan_as_dict

        console.print_json(json.dumps({**plan_as_dict(result), "grad_accum": grad_accum}))
    else:
        console.print(views.plan_view(result))


ContextOption = Annotated[
    int | None,
    typer.Option(
        min=1, help="Context per request, in tokens (llama.cpp, vLLM; default: the model's, at most 4096)."
    ),
]
SlotsOption = Annotated[
    int | None, typer.Option(min=1, help="llama.cpp: requests decoded together (default: cores, at least 4).")
]
TensorParallelOption = Annotated[int, typer.Option(min=1, help="vLLM: GPUs to split the model over.")]


@app.command()
@user_errors
def serve(
    target: Annotated[
        Path, typer.Argument(help="A run file or run directory, a .gguf file, or a model folder.")
    ],
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but loopback needs --api-key.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="LLAMATAILOR_API_KEY", help="Bearer key required on /v1 routes.")
    ] = None,
    engine: Annotated[
        str, typer.Option(help="auto, llama.cpp (llama-server, GGUF), transformers or vllm (GPUs).")
    ] = "auto",
    adapter: Annotated[
        list[str] | None,
        typer.Option(help="NAME=PATH: serve this adapter too (a folder; a LoRA .gguf for llama.cpp)."),
    ] = None,
    context: ContextOption = None,
    slots: SlotsOption = None,
    tensor_parallel: TensorParallelOption = 1,
    max_queue: Annotated[int, typer.Option(min=0, help="Requests that may wait; more get 429.")] = 16,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body.")] = 1 << 20,
    max_tokens_limit: Annotated[
        int | None, typer.Option(help="Largest max_tokens a request may ask.")
    ] = None,
    log_requests: Annotated[
        Path | None, typer.Option(help="Append requests and answers (PII masked) to this JSONL file.")
    ] = None,
) -> None:
    """An OpenAI-compatible API (chat, completions, streaming, /metrics) over a run's model or a GGUF file."""
    import uvicorn

    from llamatailor.serve.app import ServerSettings, create_app
    from llamatailor.serve.backend import check_port_free, is_loopback
    from llamatailor.serve.target import ENGINES, ServeOptions, build_served, parse_adapters

    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r}: expected {', '.join(ENGINES)}")
    if not is_loopback(host) and not api_key:
        raise ConfigError(
            f"--host {host}: binding beyond this machine needs --api-key (or LLAMATAILOR_API_KEY)"
        )
    options = ServeOptions(engine, parse_adapters(adapter or []), context, slots, tensor_parallel)  # type: ignore[arg-type]
    check_port_free(host, port)  # before the engine: starting one takes seconds to minutes
    served = build_served(target, options)
    settings = ServerSettings(api_key, max_body_bytes, max_queue, max_tokens_limit, request_log=log_requests)
    console.print(
        f"serving {', '.join(served.model_ids())} on http://{host}:{port}/v1 ({served.description})"
    )
    try:
        uvicorn.run(
            create_app(served, settings),
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=30,
        )
    finally:
        served.close()


@app.command()
@user_errors
def ui(
    runs: Annotated[
        Path, typer.Option(help="The folder whose runs to show (a run file's output_dir).")
    ] = Path("runs"),
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs --api-key.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 7860,
    api_key: Annotated[
        str | None, typer.Option(envvar="LLAMATAILOR_API_KEY", help="Key the browser must present.")
    ] = None,
) -> None:
    """A local web dashboard over a runs folder: runs and their stages, live training curves, eval and
    export reports, chat side by side, and a form that starts new runs (docs/ui.md)."""
    import uvicorn

    from llamatailor.serve.backend import check_port_free, is_loopback
    from llamatailor.ui.app import create_app
    from llamatailor.ui.paths import RunsFolder
    from llamatailor.ui.security import LOOPBACK_NAMES
    from llamatailor.ui.settings import UiSettings

    if not is_loopback(host) and not api_key:
        raise ConfigError(
            f"--host {host}: binding beyond this machine needs --api-key (or LLAMATAILOR_API_KEY)"
        )
    if runs.exists() and not runs.is_dir():
        raise ConfigError(f"--runs {runs}: a file, not a folder of runs (a run file's output_dir)")
    check_port_free(host, port)
    # Without a key only loopback names are answered (a page on another name that resolves to 127.0.0.1
    # must not reach the runs); with a key, the key is the gate, whatever name the browser used.
    settings = UiSettings(RunsFolder.at(runs), api_key, ("*",) if api_key else LOOPBACK_NAMES)
    if not settings.runs.root.is_dir():
        console.print(
            f"[yellow]{settings.runs.root} does not exist yet: the first run started from the form makes it[/]"
        )
    if api_key and len(api_key) < 16:
        console.print("[yellow]--api-key is shorter than 16 characters: easy to guess on a network[/]")
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    key = f"/?key={api_key}" if api_key else "/"
    # soft_wrap: a long key must not be broken over lines in a log
    console.print(
        f"llamatailor ui: runs in {settings.runs.root}; open http://{shown}:{port}{key}", soft_wrap=True
    )
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)


@app.command()
@user_errors
def chat(
    config: Annotated[Path | None, typer.Argument(help="The run file or run directory.")] = None,
    overrides: OverridesArg = None,
    url: Annotated[
        str | None, typer.Option(help="Chat with a running server instead, e.g. http://127.0.0.1:8000/v1.")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="LLAMATAILOR_API_KEY", help="The server's key.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="The server's model (default: its first).")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Answer one prompt and exit.")] = None,
    base: Annotated[bool, typer.Option("--base", help="Talk to the base model, adapter off.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 256,
) -> None:
    """Chat with a run's tuned model: one prompt with --prompt, else a REPL (/reset, /exit)."""
    from llamatailor.chat import ChatSession, RemoteChatSession

    if url is not None:
        session: ChatSession | RemoteChatSession = RemoteChatSession(url, api_key, model, max_new_tokens)
    elif config is None:
        raise ConfigError("chat needs a run file or run directory, or --url of a running server")
    else:
        session = ChatSession(_load(config, overrides), use_base=base, max_new_tokens=max_new_tokens)
    if prompt is not None:
        session.reply(prompt, on_text=_stream)
        console.print()
        return
    console.print("[dim]Type a message; /reset clears the conversation, /exit or Ctrl-D quits.[/]")
    while True:
        try:
            text = console.input("[bold cyan]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            session.reset()
            continue
        if text.strip():
            console.print("[bold green]model>[/] ", end="")
            session.reply(text, on_text=_stream)
            console.print()


def _stream(piece: str) -> None:
    console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"llamatailor {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """llamatailor: plan -> prepare -> train -> eval -> merge -> export -> serve."""
