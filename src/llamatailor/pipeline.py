"""The stages in order, what each depends on, and their records in the run's manifest.

Each stage declares beside its code the config keys and files it reads and the files it writes
(`stage_contract.Stage`, the `STAGE` of its module); this module puts them in order. A stage is up to date
when its last run completed with the same fingerprint (the values of those keys and the hashes of those
files) and its outputs are all still there. `llamatailor run` runs the stages `stages_to_run` names: those
not up to date, and those reading what a stage before them is about to rewrite.
"""

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llamatailor
from llamatailor import __version__
from llamatailor.config import RunConfig
from llamatailor.data.prepare import STAGE as PREPARE
from llamatailor.distributed import is_main_process
from llamatailor.evaluate.stage import STAGE as EVAL
from llamatailor.export.merge import STAGE as MERGE
from llamatailor.export.stage import STAGE as EXPORT
from llamatailor.rundir import now_iso, sha256_file
from llamatailor.stage_contract import Stage
from llamatailor.train.dpo import STAGE as DPO
from llamatailor.train.sft import STAGE as TRAIN

BULKY_FIELDS = ("report", "samples", "files")
TRACKED_PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "tokenizers", "gguf")

STAGES: tuple[Stage, ...] = (PREPARE, TRAIN, DPO, EVAL, MERGE, EXPORT)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}
PACKAGE_DIR = Path(llamatailor.__file__).resolve().parent


def input_hashes(stage: Stage, config: RunConfig) -> dict[str, str]:
    """SHA-256 of each declared input file of `stage` that exists, by absolute path."""
    return {str(path.resolve()): sha256_file(path) for path in stage.inputs(config) if path.is_file()}


def fingerprint(stage: Stage, config: RunConfig, inputs: dict[str, str]) -> str:
    """SHA-256 over the stage's name, the values of its declared config keys and its input hashes."""
    payload = {"stage": stage.name, "config": config.section_hash(*stage.config_keys), "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def is_up_to_date(stage: Stage, config: RunConfig) -> bool:
    """Whether the manifest records a complete run of `stage` with today's fingerprint, and its outputs exist."""
    if stage.remote_inputs(config):
        return False  # a hub data set can change upstream and has no local file to hash
    record = config.run_dir.stage_record(stage.name)
    if not record or record.get("status") != "complete":
        return False
    if not all(path.exists() for path in stage.outputs(config)):
        return False
    return record.get("fingerprint") == fingerprint(stage, config, input_hashes(stage, config))


def stages_to_run(config: RunConfig, stages: Sequence[Stage] = STAGES) -> list[Stage]:
    """The enabled stages among `stages` (in pipeline order) that `llamatailor run` runs for `config` now.

    A stage runs when it is not up to date (`is_up_to_date`), or when one of its declared inputs is a
    declared output of a stage before it that runs: that input is about to be rewritten. Reads the manifest
    and hashes input files; writes nothing. `run` asks again after each stage it runs, so that a stage
    whose inputs came out byte for byte the same is still skipped.
    """
    chosen: list[Stage] = []
    rewritten: set[Path] = set()
    for stage in stages:
        if not stage.enabled(config):
            continue
        reads_rewritten = any(path.resolve() in rewritten for path in stage.inputs(config))
        if reads_rewritten or not is_up_to_date(stage, config):
            chosen.append(stage)
            rewritten.update(path.resolve() for path in stage.outputs(config))
    return chosen


def run_stage(stage: Stage, config: RunConfig, **kwargs: Any) -> Any:
    """Run one stage, recording its start, inputs, timing, outcome and a summary in the manifest (by the main
    process only: under torchrun every process runs the stage, one keeps the books)."""
    if not is_main_process():
        return stage.action(config, **kwargs)
    run = config.run_dir
    stage.precheck(config)
    source = source_revision(PACKAGE_DIR)
    start_run(config, source)
    inputs = input_hashes(stage, config)
    record: dict[str, Any] = {
        "status": "running",
        "fingerprint": fingerprint(stage, config, inputs),
        "inputs": inputs,
        "started_at": now_iso(),
        # Who runs it: `llamatailor ui` tells a stage still running from one whose process died.
        "pid": os.getpid(),
        "host": platform.node(),
        # The llamatailor source this stage ran on, kept with the stage: a later stage run after a code
        # update records its own and leaves this one as it was.
        "llamatailor": __version__,
        **source,
    }
    run.set_stage_record(stage.name, record)
    started = time.perf_counter()
    try:
        result = stage.action(config, **kwargs)
    except BaseException as exc:
        # A Ctrl-C or the UI's Stop (SIGINT) carries no message of its own.
        message = str(exc) or ("interrupted (SIGINT)" if isinstance(exc, KeyboardInterrupt) else "")
        record.update(
            status="failed",
            error=f"{type(exc).__name__}: {message}",
            finished_at=now_iso(),
            seconds=round(time.perf_counter() - started, 2),
        )
        run.set_stage_record(stage.name, record)
        raise
    record.update(
        status="complete",
        finished_at=now_iso(),
        seconds=round(time.perf_counter() - started, 2),
        summary=summarize(result),
    )
    run.set_stage_record(stage.name, record)
    return result


def start_run(config: RunConfig, source: dict[str, Any]) -> None:
    """Write the resolved config and the manifest's run-wide facts as of this stage start (versions, config
    hash, and `source`: the llamatailor checkout's git revision, see `source_revision`).

    The manifest is read first: one that cannot be read stops the stage before anything is written."""
    run = config.create_run_dir()
    manifest = run.read_manifest()
    resolved = config.resolved()
    run.write_config(resolved)
    run.update_manifest(
        name=config.name,
        created_at=manifest.get("created_at", now_iso()),
        config_hash=hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest(),
        llamatailor=__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        packages={name: _version(name) for name in TRACKED_PACKAGES},
        **source,
    )


def summarize(result: Any) -> dict[str, Any] | None:
    """A small JSON-able summary of a stage result for the manifest (bulky fields left out)."""
    if not dataclasses.is_dataclass(result):
        return None
    summary = {}
    for field in dataclasses.fields(result):
        if field.name not in BULKY_FIELDS:
            value = getattr(result, field.name)
            summary[field.name] = str(value) if isinstance(value, Path) else value
    return summary


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def source_revision(package_dir: Path) -> dict[str, Any]:
    """The git revision of the checkout holding the llamatailor package at `package_dir`, and whether the
    package's files there differ from it (`git status --porcelain` on the package folder, untracked files
    included): `{"git_revision": ..., "git_dirty": ...}`, both None when the package is not a tracked part of
    a git checkout (an installed wheel, whose version the manifest records as `llamatailor`; or a virtual
    environment inside the user's own repository) or git cannot tell.

    Asked of the package's folder, never the working directory: the user's own project is not the code that
    ran. Cached: a process runs the code it imported, whatever happens to the files later.
    """
    unknown = {"git_revision": None, "git_dirty": None}
    if _git(package_dir, "ls-files", "--error-unmatch", "--", "__init__.py") is None:
        return unknown
    revision = _git(package_dir, "rev-parse", "--verify", "HEAD")
    changes = _git(package_dir, "--no-optional-locks", "status", "--porcelain", "--", ".")
    if not revision or changes is None:
        return unknown
    return {"git_revision": revision.strip(), "git_dirty": bool(changes.strip())}


def _git(folder: Path, *args: str) -> str | None:
    """A git command's output, run in `folder`; None when git is missing, fails or takes over 5 seconds."""
    # GIT_DIR and the like (set inside a git hook, say) would point git at another repository than folder's.
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    try:
        result = subprocess.run(
            ["git", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
            env=environment,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None
