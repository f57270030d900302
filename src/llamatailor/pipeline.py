"""The stages in order, what each depends on, and their records in the run's manifest.

Each stage declares beside its code the config keys and files it reads and the files it writes
(`stage_contract.Stage`, the `STAGE` of its module); this module puts them in order. A stage is up to date
when its last run completed with the same fingerprint (the values of those keys and the hashes of those
files) and its outputs are all still there. `llamatailor run` runs the stages `stages_to_run` names: those
not up to date, and those reading what a stage before them is about to rewrite.
"""

import dataclasses
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
    start_run(config)
    inputs = input_hashes(stage, config)
    record: dict[str, Any] = {
        "status": "running",
        "fingerprint": fingerprint(stage, config, inputs),
        "inputs": inputs,
        "started_at": now_iso(),
        # Who runs it: `llamatailor ui` tells a stage still running from one whose process died.
        "pid": os.getpid(),
        "host": platform.node(),
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


def start_run(config: RunConfig) -> None:
    """Write the resolved config and the manifest's run-wide facts (versions, config hash, git revision)."""
    run = config.create_run_dir()
    resolved = config.resolved()
    run.write_config(resolved)
    manifest = run.read_manifest()
    run.update_manifest(
        name=config.name,
        created_at=manifest.get("created_at", now_iso()),
        config_hash=hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest(),
        llamatailor=__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        packages={name: _version(name) for name in TRACKED_PACKAGES},
        git_revision=_git_revision(),
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


def _git_revision() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None
