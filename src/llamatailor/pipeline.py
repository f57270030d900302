"""The stages in order, what each depends on, and their records in the run's manifest.

A stage is up to date when its last run completed with the same fingerprint (the config keys it reads
and the hashes of its input files) and its outputs are all still there; `llamatailor run` skips it then.
"""

import dataclasses
import hashlib
import importlib.metadata
import json
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamatailor import __version__
from llamatailor.config import SPLITS, RunConfig
from llamatailor.data.prepare import check_inputs, prepare
from llamatailor.distributed import is_main_process
from llamatailor.evaluate.stage import evaluate_run
from llamatailor.export.merge import merge_run
from llamatailor.export.stage import export_run
from llamatailor.rundir import now_iso, sha256_file
from llamatailor.train.dpo import train_dpo
from llamatailor.train.sft import train_sft

BULKY_FIELDS = ("report", "samples", "files")
TRACKED_PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "tokenizers", "gguf")


@dataclass(frozen=True)
class Stage:
    name: str
    config_keys: tuple[str, ...]
    inputs: Callable[[RunConfig], list[Path]]
    outputs: Callable[[RunConfig], list[Path]]
    action: Callable[..., Any]
    enabled: Callable[[RunConfig], bool] = lambda config: True
    # Checks that can fail before the run directory is created or touched (raise a user error).
    precheck: Callable[[RunConfig], Any] = lambda config: None


def _prepare_inputs(config: RunConfig) -> list[Path]:
    template = [config.model.chat_template] if config.model.chat_template else []
    return [source.path for _, source in config.data.inputs() if source.path is not None] + template


def _weights(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _train_outputs(config: RunConfig) -> list[Path]:
    run = config.run_dir
    if config.train.method == "full":
        return [run.model / "config.json", *_weights(run.model), run.metrics]
    return [run.adapter / "adapter_config.json", run.adapter / "adapter_model.safetensors", run.metrics]


STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare",
        ("seed", "model", "data"),
        _prepare_inputs,
        lambda config: [
            *(config.run_dir.split(name) for name in SPLITS),
            config.run_dir.rejected,
            config.run_dir.data_report,
        ],
        prepare,
        precheck=check_inputs,
    ),
    Stage(
        "train",
        ("seed", "model", "data", "train"),
        lambda config: [config.run_dir.split("train"), config.run_dir.split("val")],
        _train_outputs,
        train_sft,
    ),
    Stage(
        "dpo",
        ("seed", "model", "data", "train", "dpo"),
        lambda config: [
            config.run_dir.preference_split("train"),
            config.run_dir.preference_split("val"),
            *_weights(config.run_dir.trained),
        ],
        lambda config: [
            config.run_dir.dpo / "adapter" / "adapter_model.safetensors",
            config.run_dir.dpo / "metrics.jsonl",
        ],
        train_dpo,
        enabled=lambda config: config.dpo.enabled,
    ),
    Stage(
        "eval",
        ("model", "eval", "dpo.enabled"),
        lambda config: [config.run_dir.split("test"), *_weights(config.run_dir.final(config.dpo.enabled))],
        lambda config: [
            config.run_dir.eval / name for name in ("metrics.json", "samples.jsonl", "report.md")
        ],
        evaluate_run,
    ),
    Stage(
        "merge",
        ("model", "dpo.enabled", "export.merge_dtype", "export.merge_tolerance", "export.check_samples"),
        lambda config: [config.run_dir.split("val"), *_weights(config.run_dir.final(config.dpo.enabled))],
        lambda config: [
            config.run_dir.merged / "config.json",
            config.run_dir.merged / "merge_report.json",
            *_weights(config.run_dir.merged),
        ],
        merge_run,
        enabled=lambda config: bool(config.export.gguf),
    ),
    Stage(
        "export",
        ("name", "model", "data.system_prompt", "data.max_seq_len", "eval", "export"),
        lambda config: [
            config.run_dir.split("val"),
            config.run_dir.split("test"),
            *_weights(config.run_dir.merged),
        ],
        lambda config: [
            *(config.run_dir.gguf_file(config.name, t) for t in config.export.gguf),
            config.run_dir.gguf / "Modelfile",
            config.run_dir.gguf / "export_report.json",
        ],
        export_run,
        enabled=lambda config: bool(config.export.gguf),
    ),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}


def input_hashes(stage: Stage, config: RunConfig) -> dict[str, str]:
    return {str(path.resolve()): sha256_file(path) for path in stage.inputs(config) if path.is_file()}


def fingerprint(stage: Stage, config: RunConfig, inputs: dict[str, str]) -> str:
    payload = {"stage": stage.name, "config": config.section_hash(*stage.config_keys), "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def is_up_to_date(stage: Stage, config: RunConfig) -> bool:
    run = config.run_dir
    if stage.name == "prepare" and any(source.hub for _, source in config.data.inputs()):
        return False  # a hub data set can change upstream and has no local file to hash
    record = run.stage_record(stage.name)
    if not record or record.get("status") != "complete":
        return False
    if not all(path.exists() for path in stage.outputs(config)):
        return False
    return record.get("fingerprint") == fingerprint(stage, config, input_hashes(stage, config))


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
    }
    run.set_stage_record(stage.name, record)
    started = time.perf_counter()
    try:
        result = stage.action(config, **kwargs)
    except BaseException as exc:
        record.update(
            status="failed", error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - started
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
