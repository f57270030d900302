"""What `llamatailor serve TARGET` serves, and on which engine: a run's best artifact, a GGUF file, or a model
folder.

For a run: its GGUF export when the export passed its gates (llama.cpp's server; the Modelfile's type), else
its merged folder, else the base with the run's adapter (transformers). `--engine transformers` (or `vllm`)
skips the GGUF: the merged folder when there is one and no `--adapter` is given, else the base with the run's
adapter and every `--adapter NAME=PATH`. A GGUF file is served by llama.cpp's server, with LoRA GGUF files as
adapters. A merged folder or GGUF file counts only while its stage is up to date with the
adapter and the run file (the manifest's fingerprints, as `llamatailor run` judges them): after a new
training, the adapter itself is served, never the model merged from the one before.
"""

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from llamatailor.config import ModelSection, RunConfig, load_config
from llamatailor.errors import ConfigError
from llamatailor.export.gguf_lora import lora_gguf_paths
from llamatailor.generation.prompts import GGUFPrompter, Prompter, TokenizerPrompter
from llamatailor.hardware import cpu_threads
from llamatailor.models.loading import ChatTokenizer, load_saved_tokenizer
from llamatailor.models.source import local_folder
from llamatailor.serve.backend import Backend
from llamatailor.serve.llama_server import LlamaServerBackend, default_slots
from llamatailor.serve.models import transformers_models

EngineChoice = Literal["auto", "llama.cpp", "transformers", "vllm"]
ENGINES = ("auto", "llama.cpp", "transformers", "vllm")
log = logging.getLogger(__name__)
DEFAULT_CONTEXT = 4096  # tokens per request when --context is not given, if the model was trained for as many


@dataclass(frozen=True)
class ServeOptions:
    """`adapters`: NAME -> a PEFT adapter folder (transformers, vLLM) or a LoRA GGUF file (llama.cpp);
    `context`: tokens per request (per slot; None: the model's trained context, at most DEFAULT_CONTEXT);
    `slots`: llama-server's parallel slots (None: `default_slots()`); `tensor_parallel`: GPUs vLLM splits the
    model over."""

    engine: EngineChoice = "auto"
    adapters: dict[str, Path] = field(default_factory=dict)
    context: int | None = None
    slots: int | None = None
    tensor_parallel: int = 1


def parse_adapters(items: list[str]) -> dict[str, Path]:
    adapters = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {item!r}: expected NAME=PATH")
        adapters[name] = Path(path)
    return adapters


def build_served(target: Path, options: ServeOptions) -> Backend:
    """The backend for `llamatailor serve TARGET`. Raises ConfigError for a target or option that does not
    fit, ModelLoadError when an engine cannot start."""
    if not target.exists():
        raise ConfigError(
            f"{target}: no such file or folder; expected a run file or run directory, a .gguf file or a model folder"
        )
    if target.suffix == ".gguf":
        if options.engine in ("transformers", "vllm"):
            raise ConfigError(f"{target}: a GGUF file is served by llama.cpp, not {options.engine}")
        return gguf_backend(target.stem, target, None, None, options)
    if (target / "config.json").is_file():
        if options.engine == "llama.cpp":
            raise ConfigError(
                f"{target}: a model folder is served by transformers or vllm; llama.cpp serves a .gguf file "
                "(`llamatailor export` writes one)"
            )
        section = ModelSection(base=str(target))
        refuse_unused_options("vllm" if options.engine == "vllm" else "transformers", options)
        if options.engine == "vllm":
            context = options.context or folder_context(target)
            return vllm_backend(
                target.name, target, target, section, None, options.adapters, context, options.tensor_parallel
            )
        distinct_names(target.name, options.adapters)
        return transformers_models(section, target.name, options.adapters, target, None)
    return run_served(load_config(target), options)


def gguf_backend(
    name: str, gguf: Path, chat: ChatTokenizer | None, system_prompt: str | None, options: ServeOptions
) -> LlamaServerBackend:
    """llama-server over `gguf`, with each `--adapter NAME=FILE.gguf` as a LoRA a request's `model` chooses;
    prompts by the run's training tokenizer when there is one (export checked that llama.cpp tokenizes
    identically), else by the file's own vocabulary and template."""
    refuse_unused_options("llama.cpp", options)
    distinct_names(name, options.adapters)
    for adapter, path in options.adapters.items():
        if path.suffix != ".gguf":
            raise ConfigError(f"--adapter {adapter}={path}: a GGUF file is served with LoRA GGUF files")
        if not path.is_file():
            raise ConfigError(f"--adapter {adapter}={path}: no such file")
        label = f"--adapter {adapter}={path}"
        refuse_non_lora(label, gguf_metadata(path, label))
    fields = gguf_metadata(gguf)
    if fields.get("general.type") == "adapter":
        raise ConfigError(
            f"{gguf}: a LoRA adapter (general.type 'adapter'), not a model: serve its base GGUF with "
            f"--adapter NAME={gguf}"
        )
    prompter: Prompter = TokenizerPrompter(chat, system_prompt) if chat else GGUFPrompter(vocabulary(gguf))
    names: dict[str, int | None] = {name: None, **{a: i for i, a in enumerate(options.adapters)}}
    slots = options.slots or default_slots()
    loras = list(options.adapters.values())
    context = options.context or min(DEFAULT_CONTEXT, metadata_context(fields))
    return LlamaServerBackend(
        gguf, prompter, names, loras, context, slots, cpu_threads(), gguf_vocab_size(gguf, fields)
    )


def gguf_metadata(path: Path, label: str | None = None) -> dict[str, Any]:
    """A GGUF file's metadata (string arrays as their lengths), read without its tensors. Raises ConfigError
    starting with `label` (default: the path) for a file that is not GGUF."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    try:
        fields, _ = read_gguf_metadata(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{label or path}: cannot read it as a GGUF file ({exc})") from None
    return dict(fields)


def trained_context(gguf: Path) -> int:
    """The context the GGUF's model was trained for (`<arch>.context_length`; DEFAULT_CONTEXT when absent).
    Raises ConfigError for a file that is not GGUF."""
    return metadata_context(gguf_metadata(gguf))


def metadata_context(fields: dict[str, Any]) -> int:
    """`trained_context` from metadata already read."""
    return int(fields.get(f"{fields.get('general.architecture', 'llama')}.context_length") or DEFAULT_CONTEXT)


def gguf_vocab_size(gguf: Path, fields: dict[str, Any]) -> int:
    """llama.cpp's n_vocab: the number of entries in `tokenizer.ggml.tokens` (the reader gives a string
    array's length unless asked for its strings). Raises ConfigError for a file without a vocabulary."""
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ConfigError(
            f"{gguf}: no vocabulary (tokenizer.ggml.tokens) in its metadata: not a model to serve"
        )
    return len(tokens) if isinstance(tokens, list) else int(tokens)


def refuse_non_lora(label: str, fields: dict[str, Any]) -> None:
    """Raises ConfigError unless the GGUF is a LoRA adapter as llama.cpp loads one (`general.type` "adapter",
    `adapter.type` "lora", as convert_lora_to_gguf.py and export.gguf_lora write them), saying what it is."""
    kind, adapter = fields.get("general.type"), fields.get("adapter.type")
    if kind == "adapter" and adapter == "lora":
        return
    if kind == "adapter":
        what = f"a {adapter or 'untyped'} adapter (adapter.type {adapter!r})"
    else:
        architecture = fields.get("general.architecture", "unknown architecture")
        what = f"a full {architecture} model (general.type {kind or 'not set'})"
    raise ConfigError(
        f"{label}: {what}, not a LoRA adapter; --adapter takes a LoRA GGUF (general.type 'adapter', "
        "adapter.type 'lora': `llamatailor export` with export.lora_gguf, or llama.cpp's "
        "convert_lora_to_gguf.py), and a full model is served as the TARGET"
    )


OPTION_ENGINES = {"--slots": "llama.cpp", "--tensor-parallel": "vllm"}  # engine-specific options


def refuse_unused_options(engine: str, options: ServeOptions) -> None:
    """Raises ConfigError naming an option that `engine`, the one chosen for the target, would ignore, and
    the engine that uses it. A value that changes nothing passes: --tensor-parallel 1 (the default), --slots 1
    on transformers (which answers one request at a time)."""
    given = {
        "--slots": options.slots if not (engine == "transformers" and options.slots == 1) else None,
        "--tensor-parallel": options.tensor_parallel if options.tensor_parallel != 1 else None,
    }
    for option, value in given.items():
        if value is not None and OPTION_ENGINES[option] != engine:
            raise ConfigError(
                f"{option} {value}: only the {OPTION_ENGINES[option]} engine uses it, and this target is "
                f"served by {engine}"
            )


def distinct_names(base: str, adapters: dict[str, Path], run: str | None = None) -> None:
    """Raises ConfigError when an `--adapter` name would hide the base (`base`), or the run's own adapter
    (`run`): each model name must choose one thing."""
    taken = {name for name in (base, run) if name is not None}
    clash = sorted(taken & set(adapters))
    if clash:
        raise ConfigError(
            f"--adapter {clash[0]}=...: the name {clash[0]!r} is taken (by the "
            f"{'base model' if clash[0] == base else 'run'}); give this adapter another name"
        )


def vllm_backend(*args: Any) -> Backend:
    """vLLM's server (serve.vllm_backend), imported only when asked for."""
    from llamatailor.serve.vllm_backend import vllm_backend as start

    return start(*args)


def vocabulary(gguf: Path) -> Any:
    """The file's vocabulary and metadata, loaded without its weights (llama-cpp-python)."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)


def run_served(config: RunConfig, options: ServeOptions) -> Backend:
    """A run: prompts by its training tokenizer with its system prompt (`data.system_prompt`), on every
    engine, so a request renders the ids training did."""
    run, system_prompt, engine, adapters = (
        config.run_dir,
        config.data.system_prompt,
        options.engine,
        options.adapters,
    )
    if engine in ("auto", "llama.cpp") and adapters and all(p.suffix == ".gguf" for p in adapters.values()):
        return run_lora_ggufs(config, options)
    # folder adapters are for transformers (or vLLM): `auto` passes the merged GGUF over for them
    gguf = exported_gguf(config) if engine == "llama.cpp" or (engine == "auto" and not adapters) else None
    if gguf is not None:
        chat = load_saved_tokenizer(run.merged, config.model)
        return gguf_backend(config.name, gguf, chat, system_prompt, options)
    if engine == "llama.cpp":
        raise ConfigError(f"{run.root}: no GGUF export that passed its gates; run `llamatailor export` first")
    refuse_unused_options("vllm" if engine == "vllm" else "transformers", options)
    merged = not adapters and (run.merged / "config.json").is_file() and stages_current(config, "merge")
    final = run.final(config.dpo.enabled)
    if engine == "vllm":
        return run_on_vllm(config, options, merged)
    if merged:
        section = ModelSection(base=str(run.merged))
        return transformers_models(section, config.name, {}, run.merged, system_prompt)
    distinct_names("base", adapters, config.name)
    return transformers_models(config.model, "base", {config.name: final, **adapters}, final, system_prompt)


def run_lora_ggufs(config: RunConfig, options: ServeOptions) -> Backend:
    """llama-server over the run's base GGUF with the run's LoRA GGUF and every `--adapter NAME=FILE.gguf`
    (export.lora_gguf wrote and checked the run's two files); model `base` is the base alone. Raises
    ConfigError when the run has no such export that passed its checks."""
    base, lora = lora_gguf_paths(config)
    if exported_gguf(config) is None or not (base.is_file() and lora.is_file()):
        raise ConfigError(
            f"{config.run_dir.root}: LoRA GGUF adapters are served over the run's base GGUF: set "
            f"export.lora_gguf: true and run `llamatailor export` (it writes and checks {base.name} and "
            f"{lora.name})"
        )
    distinct_names("base", options.adapters, config.name)
    chat = load_saved_tokenizer(config.run_dir.merged, config.model)
    adapters = {config.name: lora, **options.adapters}
    return gguf_backend("base", base, chat, config.data.system_prompt, replace(options, adapters=adapters))


def run_on_vllm(config: RunConfig, options: ServeOptions, merged: bool) -> Backend:
    """vLLM over the run's merged folder, or over its base with the run's adapter (and any `--adapter`) as
    LoRA modules, the base itself as model `base`."""
    run, system_prompt = config.run_dir, config.data.system_prompt
    if merged:
        context = options.context or folder_context(run.merged)
        section = ModelSection(base=str(run.merged))
        return vllm_backend(
            config.name, run.merged, run.merged, section, system_prompt, {}, context, options.tensor_parallel
        )
    final = run.final(config.dpo.enabled)
    distinct_names("base", options.adapters, config.name)
    adapters = {config.name: final, **options.adapters}
    context = options.context or folder_context(final)
    base = local_folder(config.model.base, config.model.revision)  # an alias or GGUF: its converted folder
    return vllm_backend(
        "base", base, final, config.model, system_prompt, adapters, context, options.tensor_parallel
    )


def folder_context(folder: Path) -> int:
    """The trained context of the model whose config.json (or its adapter's base) is in `folder`, at most
    DEFAULT_CONTEXT; DEFAULT_CONTEXT when the folder does not say."""
    config = folder / "config.json"
    trained = (
        json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
        if config.is_file()
        else None
    )
    return min(DEFAULT_CONTEXT, int(trained or DEFAULT_CONTEXT))


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
