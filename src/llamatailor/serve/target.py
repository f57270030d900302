"""What `llamatailor serve TARGET` serves: a run's best artifact, a GGUF file, or a model folder.

For a run: its GGUF export when the export passed its gates (llama.cpp; the Modelfile's type), else its
merged folder, else the base with the run's adapter (transformers). `--engine transformers` skips the GGUF:
the merged folder when there is one and no `--adapter` is given, else the base with the run's adapter and
every `--adapter NAME=PATH`. A merged folder or GGUF file counts only while its stage is up to date with the
adapter and the run file (the manifest's fingerprints, as `llamatailor run` judges them): after a new
training, the adapter itself is served, never the model merged from the one before.
"""

import json
import logging
import os
from pathlib import Path
from typing import Literal

from llamatailor.config import ModelSection, RunConfig, load_config
from llamatailor.errors import ConfigError
from llamatailor.models.loading import load_saved_tokenizer
from llamatailor.serve.models import ServedModels, llama_cpp_models, transformers_models

EngineChoice = Literal["auto", "llama.cpp", "transformers"]
log = logging.getLogger(__name__)


def parse_adapters(items: list[str]) -> dict[str, Path]:
    adapters = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {item!r}: expected NAME=PATH")
        adapters[name] = Path(path)
    return adapters


def build_served(target: Path, engine: EngineChoice, adapters: dict[str, Path], context: int) -> ServedModels:
    threads = os.cpu_count() or 1
    if not target.exists():
        raise ConfigError(
            f"{target}: no such file or folder; expected a run file or run directory, a .gguf file or a model folder"
        )
    if target.suffix == ".gguf":
        if engine == "transformers":
            raise ConfigError(f"{target}: a GGUF file is served by llama.cpp, not transformers")
        return llama_cpp_models(target.stem, target, None, context, threads, None)
    if (target / "config.json").is_file():
        return transformers_models(ModelSection(base=str(target)), target.name, adapters, target, None)
    return run_served(load_config(target), engine, adapters, context, threads)


def run_served(
    config: RunConfig, engine: EngineChoice, adapters: dict[str, Path], context: int, threads: int
) -> ServedModels:
    """A run: prompts by its training tokenizer with its system prompt (`data.system_prompt`), on every
    engine, so a request renders the ids training did."""
    run, system_prompt = config.run_dir, config.data.system_prompt
    gguf = exported_gguf(config)
    if engine != "transformers" and gguf is not None:
        chat = load_saved_tokenizer(run.merged, config.model)
        return llama_cpp_models(config.name, gguf, chat, context, threads, system_prompt)
    if engine == "llama.cpp":
        raise ConfigError(f"{run.root}: no GGUF export that passed its gates; run `llamatailor export` first")
    if not adapters and (run.merged / "config.json").is_file() and stages_current(config, "merge"):
        merged = ModelSection(base=str(run.merged))
        return transformers_models(merged, config.name, {}, run.merged, system_prompt)
    final = run.final(config.dpo.enabled)
    return transformers_models(config.model, "base", {config.name: final, **adapters}, final, system_prompt)


def stages_current(config: RunConfig, *names: str) -> bool:
    """Whether the run's `names` stages completed and are up to date with their inputs and settings; says
    in the log when one is not (its artifact is then passed over)."""
    from llamatailor.pipeline import STAGE_BY_NAME, is_up_to_date  # the stages' code: only for a run

    for name in names:
        if not is_up_to_date(STAGE_BY_NAME[name], config):
            log.warning(
                "%s: the %s stage's output is not up to date with the run (trained again since, or settings "
                "changed): not serving it; `llamatailor run` brings it up to date",
                config.run_dir.root,
                name,
            )
            return False
    return True


def exported_gguf(config: RunConfig) -> Path | None:
    run = config.run_dir
    report = run.gguf / "export_report.json"
    if not report.is_file() or json.loads(report.read_text(encoding="utf-8"))["failures"]:
        return None
    if not stages_current(config, "merge", "export"):
        return None
    chosen = config.export.modelfile_from or (config.export.gguf[0] if config.export.gguf else None)
    path = run.gguf_file(config.name, chosen) if chosen else None
    return path if path is not None and path.is_file() else None


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")
