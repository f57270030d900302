"""The `llamatailor` command: parse arguments, load the run file, call one stage, print its result."""

import functools
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llamatailor import __version__
from llamatailor.config import RunConfig, load_config
from llamatailor.errors import ConfigError, LlamatailorError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Fine-tune a Llama-family model for one job: prepare -> train -> eval (then chat with it).",
)
console = Console()
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
    handler = RichHandler(console=errors, show_path=False, show_time=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("llamatailor").setLevel(logging.INFO)


def _load(config: Path, overrides: list[str] | None) -> RunConfig:
    return load_config(config, overrides or [])


def _run_stage(name: str, config: RunConfig) -> None:
    from llamatailor import views
    from llamatailor.pipeline import STAGE_BY_NAME, run_stage

    console.rule(f"[bold]{name}[/] · run {config.name}")
    if name == "eval":
        with _progress() as progress:
            tasks: dict[str, Any] = {}

            def on_progress(label: str, done: int, total: int) -> None:
                if label not in tasks:
                    tasks[label] = progress.add_task(f"answering ({label})", total=total)
                progress.update(tasks[label], completed=done)

            result = run_stage(STAGE_BY_NAME[name], config, progress=on_progress)
        console.print(views.eval_view(result, config.eval.show))
    elif name == "train":
        console.print(views.train_view(run_stage(STAGE_BY_NAME[name], config)))
    else:
        with _progress() as progress:
            task = progress.add_task("reading", total=None)

            def on_progress(phase: str, done: int) -> None:
                progress.update(task, description=phase, completed=done)

            result = run_stage(STAGE_BY_NAME[name], config, progress=on_progress)
        console.print(views.prepare_view(result))
        for line in result.first_rejections:  # unwrapped, so that file:line stays whole
            console.print(f"  {line}", soft_wrap=True, markup=False, highlight=False)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


@app.command()
@user_errors
def prepare(config: ConfigArg, overrides: OverridesArg = None) -> None:
    """Read the data files, check and render every sample, split, and write data/ and its report."""
    _run_stage("prepare", _load(config, overrides))


@app.command()
@user_errors
def train(config: ConfigArg, overrides: OverridesArg = None) -> None:
    """Fine-tune with LoRA on the prepared data; writes adapter/, metrics.jsonl and loss.png."""
    _run_stage("train", _load(config, overrides))


@app.command(name="eval")
@user_errors
def evaluate(config: ConfigArg, overrides: OverridesArg = None) -> None:
    """Answer the held-out test prompts with the base and the tuned model and score both."""
    _run_stage("eval", _load(config, overrides))


@app.command()
@user_errors
def run(
    config: ConfigArg,
    overrides: OverridesArg = None,
    force: Annotated[bool, typer.Option("--force", help="Run every stage, even those up to date.")] = False,
) -> None:
    """Run all stages in order, skipping those whose outputs are complete for this config and inputs."""
    from llamatailor import views
    from llamatailor.evaluate.stage import load_eval_result
    from llamatailor.pipeline import STAGES, is_up_to_date

    loaded = _load(config, overrides)
    for stage in STAGES:
        if not force and is_up_to_date(stage, loaded):
            console.print(f"[dim]{stage.name}: up to date for this config and inputs, skipped[/]")
            if stage.name == "eval":
                console.print(views.eval_view(load_eval_result(loaded.run_dir), loaded.eval.show))
            continue
        _run_stage(stage.name, loaded)


@app.command()
@user_errors
def chat(
    config: ConfigArg,
    overrides: OverridesArg = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Answer one prompt and exit.")] = None,
    base: Annotated[bool, typer.Option("--base", help="Talk to the base model, adapter off.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 256,
) -> None:
    """Chat with a run's tuned model: one prompt with --prompt, else a REPL (/reset, /exit)."""
    from llamatailor.chat import ChatSession

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
