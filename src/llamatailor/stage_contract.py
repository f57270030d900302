"""What a stage declares beside its code, and the one way every stage reports progress.

Each stage module holds a `STAGE` record: the config keys and the files its code reads, the files it writes,
and what the CLI needs to run and show it. `pipeline` assembles `llamatailor run` from these records, so a
stage's fingerprint is kept next to the code it describes (tests/test_stage_contracts.py runs the stages
and checks that they read nothing they do not declare).

Importing this module loads nothing heavy (no torch, transformers or pydantic): `llamatailor --help` uses it.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from llamatailor.config import RunConfig


class Progress(Protocol):
    """How a stage reports progress: `what` it is doing now ("scanning", "answering (tuned)", "writing
    tiny-f16.gguf"), with `done` items of `total` where it counts them (`total` None: no known end).

    A message alone (no `done`) says what the stage is busy with; a count with a total is one bar per
    `what`; a count without a total is one running line whose label follows `what`.
    """

    def __call__(self, what: str, done: int | None = None, total: int | None = None) -> None: ...


def no_progress(what: str, done: int | None = None, total: int | None = None) -> None:
    """The `Progress` of a stage called without one: reports nowhere."""


def _always(config: "RunConfig") -> bool:
    return True


def _never(config: "RunConfig") -> bool:
    return False


def _no_check(config: "RunConfig") -> None:
    return None


@dataclass(frozen=True)
class Stage:
    """One stage of `llamatailor run`, declared in its own module.

    A stage is up to date when its last run completed with the same values under `config_keys` (dotted
    paths into the run file: a whole section such as `train`, or one key such as `data.max_seq_len`) and the
    same bytes in `inputs`, and every path of `outputs` exists. `name` and `output_dir` are never among the
    keys: they say where the run directory is, so changing them starts another run.

    name: the stage, and its CLI verb.
    inputs: the files the action reads (the base model's files excepted: `model.base` names them).
    outputs: the files that must exist for the stage to count as done.
    action: `action(config, **options) -> result`; it may take `progress` (a `Progress`).
    enabled: whether `llamatailor run` runs the stage for this config.
    precheck: raises a user error before the run directory is created or touched.
    remote_inputs: whether the stage reads inputs with no local file to hash (a hub data set); such a
        stage is never up to date.
    trains: a training stage: the CLI runs it under torchrun for `--nproc N`, and passes `resume`/`fresh`.
    activity: what the CLI says while the stage works and reports nothing else.
    load_result: the result a completed run left in the run directory, shown when `run` skips the stage.
    """

    name: str
    config_keys: tuple[str, ...]
    inputs: Callable[["RunConfig"], list[Path]]
    outputs: Callable[["RunConfig"], list[Path]]
    action: Callable[..., Any]
    enabled: Callable[["RunConfig"], bool] = _always
    precheck: Callable[["RunConfig"], Any] = _no_check
    remote_inputs: Callable[["RunConfig"], bool] = _never
    trains: bool = False
    activity: str | None = None
    load_result: Callable[["RunConfig"], Any] | None = None

    @property
    def reports_progress(self) -> bool:
        """Whether the action takes a `progress` callback."""
        return "progress" in inspect.signature(self.action).parameters


def files_in(folder: Path) -> list[Path]:
    """Every file directly in `folder`, sorted (none when it does not exist): a trained adapter or model
    folder is read whole (weights, configs, tokenizer, chat template)."""
    return sorted(path for path in folder.iterdir() if path.is_file()) if folder.is_dir() else []


def weights(folder: Path) -> list[Path]:
    """The safetensors files in `folder`, sorted."""
    return sorted(folder.glob("*.safetensors"))


def chat_template_file(config: "RunConfig") -> list[Path]:
    """The chat template file that replaces the tokenizer's, where the run file names one."""
    return [config.model.chat_template] if config.model.chat_template else []
