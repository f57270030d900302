"""The New run form: the run file's schema (config.RunConfig) made into the form's schema for json-editor, the
form's value checked by RunConfig and by the checks `llamatailor run` makes first (model.base resolves, the
data files are readable; each problem with its field's path and the checking code's wording), the run file
it writes, and `plan`'s verdict for a GPU size."""

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from llamatailor.config import DataFile, ModelSection, RunConfig, Section, allowed_keys, describe_error
from llamatailor.data.reader import checked_path
from llamatailor.errors import DataError, LlamatailorError, ModelLoadError
from llamatailor.ui.pages import number
from llamatailor.vocabulary import SPLITS

# Sections a first run leaves alone: the form shows them folded.
FOLDED: set[tuple[str, ...]] = {("dpo",), ("eval",), ("export",), ("train", "quantization")}
FOLDED |= {("data", "clean"), ("data", "policy"), ("data", "dedup"), ("data", "pii")}
# The UI writes every run into its own runs folder: the form has no output_dir, the server sets it.
SERVER_SET = "output_dir"
DEFAULT_GPU_GIB = 24.0
# Fields a first run sets, shown first in their section (json-editor's propertyOrder; the rest keep the schema's).
FIRST: dict[tuple[str, ...], tuple[str, ...]] = {
    ("train",): ("method", "lora", "epochs", "max_steps", "learning_rate")
}
# Array items' labels ("file 1", "Add file"), by their section's class name; others are "item".
ITEM_TITLES = {DataFile.__name__: "file"}
MODEL_FIELD = "model.base"
HUB_NOTE = "a hub id: not checked here (offline); the run downloads it from the Hugging Face Hub"
SectionT = TypeVar("SectionT", bound=Section)


class FormConflict(LlamatailorError):
    """The form names a run that exists (its run file or its run directory), and resuming was not asked."""


@dataclass(frozen=True)
class FieldError:
    """One problem of the form's value: `field` is its key path (train.lora.r, data.train.0.path)."""

    field: str
    message: str


class _FactoryDefaults(GenerateJsonSchema):
    """Pydantic's JSON schema, with the defaults made by a factory too (lists, mappings, sections): pydantic
    leaves them out, and an array json-editor draws without a default starts empty (export.gguf: [] would
    turn export off, data.pii.kinds: [] PII checks)."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        """The field's default, or what its factory makes (a factory that reads other fields: none)."""
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return factory()  # type: ignore[call-arg]
        return super().get_default_value(schema)


def form_schema() -> dict[str, Any]:
    """RunConfig's JSON schema as json-editor renders it: `$ref`s inlined, `anyOf` with null collapsed to the
    other member (the field becomes optional: an opt-in checkbox, unticked is null), every other property
    required (always shown and sent, filled with its default), labels that are the run file's keys, the
    sections a first run leaves alone folded, and no output_dir (SERVER_SET)."""
    schema = RunConfig.model_json_schema(schema_generator=_FactoryDefaults)
    definitions = schema.pop("$defs", {})
    schema["properties"].pop(SERVER_SET)
    form = _form_node(_inline(schema, definitions), ())
    form["title"] = "Run file"
    return form


def _inline(node: Any, definitions: dict[str, Any]) -> Any:
    """`node` with each {"$ref": "#/$defs/X"} replaced by definition X (inlined too); RunConfig has no cycles."""
    if isinstance(node, list):
        return [_inline(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = definitions[node["$ref"].rsplit("/", 1)[-1]]
        rest = {key: value for key, value in node.items() if key != "$ref"}
        return _inline({**target, **rest}, definitions)
    return {key: _inline(value, definitions) for key, value in node.items()}


def _without_null(node: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(node without its null member, whether it had one). One member left replaces the anyOf."""
    members = node.get("anyOf")
    if not members or {"type": "null"} not in members:
        return node, False
    rest = [member for member in members if member != {"type": "null"}]
    node = {key: value for key, value in node.items() if key != "anyOf"}
    node = {**node, **rest[0]} if len(rest) == 1 else {**node, "anyOf": rest}
    if node.get("default", 0) is None:
        del node["default"]
    return node, True


def _form_node(node: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = {key: value for key, value in node.items() if key != "format"}  # format "path": json-editor's text
    if "enum" in node and "type" not in node:
        node = _enum_by_type(node)
    if "anyOf" in node:
        node["anyOf"] = [
            {**_form_node(member, path), "title": _member_title(member)} for member in node["anyOf"]
        ]
    if isinstance(node.get("items"), dict):
        title = ITEM_TITLES.get(node["items"].get("title"), "item")
        node["items"] = {**_form_node(node["items"], path), "title": title}
    if isinstance(
        node.get("additionalProperties"), dict
    ):  # a mapping (data columns, export gates): keys added
        node["options"] = {"disable_properties": False, "collapsed": True}
    if "properties" not in node:
        return node
    node.pop(
        "default", None
    )  # a section's fields carry their own defaults (its default's nulls would tick boxes)
    properties, optional = {}, []
    for key, child in node["properties"].items():
        child, nullable = _without_null(child)
        properties[key] = {**_form_node(child, (*path, key)), "title": key}
        if key in FIRST.get(path, ()):
            properties[key]["propertyOrder"] = FIRST[path].index(key) + 1
        if nullable:
            optional.append(key)
    options: dict[str, Any] = {"collapsed": path in FOLDED, "disable_properties": True}
    if optional:
        options["show_opt_in"] = True
    required = [key for key in properties if key not in optional]
    return {**node, "properties": properties, "required": required, "options": options}


def _enum_by_type(node: dict[str, Any]) -> dict[str, Any]:
    """An enum of mixed types (Literal["auto", True, False]) as an anyOf of one member per JSON type, which
    json-editor draws as a choice of kind, then of value (a select would send every value as text)."""
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string"}
    members: dict[str, list[Any]] = {}
    for value in node["enum"]:
        members.setdefault(kinds.get(type(value), "string"), []).append(value)
    rest = {key: value for key, value in node.items() if key != "enum"}
    choices: list[dict[str, Any]] = []
    for kind, values in members.items():
        if kind == "boolean":
            choices.append({"type": kind})
        elif len(values) == 1:
            choices.append({"type": kind, "const": values[0]})
        else:
            choices.append({"type": kind, "enum": values})
    return {**rest, "anyOf": choices}


def _member_title(member: dict[str, Any]) -> str:
    if "const" in member:
        return str(member["const"])
    if member.get("type") == "boolean":
        return "on / off"
    if "enum" in member:
        return "preset"
    return {"integer": "number", "number": "number", "array": "list", "object": "settings"}.get(
        str(member.get("type")), str(member.get("type", "value"))
    )


def starting_value(runs_root: Path) -> dict[str, Any]:
    """What the form shows first: a free name (run-1, run-2...), the embedded model, an empty training file
    path to fill, and LoRA with the schema's defaults; the other fields take their schema defaults."""
    index = 1
    while (runs_root / f"run-{index}").exists() or (runs_root / f"run-{index}.yaml").exists():
        index += 1
    train = RunConfig.model_fields["train"].get_default(call_default_factory=True)
    return {
        "name": f"run-{index}",
        "model": {"base": RunConfig.model_fields["model"].get_default(call_default_factory=True).base},
        "data": {"train": [{"path": ""}]},
        "train": {
            "method": train.method,
            "epochs": train.epochs,
            "learning_rate": train.learning_rate,
            "lora": {"r": train.lora.r, "alpha": train.lora.alpha},
        },
    }


@dataclass(frozen=True)
class FormCheck:
    """The form's value checked (`check_form`): `config`, None where the schema refuses it; `problems` (a run
    may start only without any); `notes` on accepted fields; `model`, model.base as `resolve_source` resolved
    it (a local folder or a hub id), None where it did not; `exists`, whether a run of the form's name is in
    the runs folder (its run file or its run directory)."""

    config: RunConfig | None
    problems: list[FieldError]
    notes: list[FieldError]
    model: str | None
    exists: bool


def check_form(value: dict[str, Any], runs_root: Path, resume: bool = False) -> FormCheck:
    """The form's value checked as `llamatailor run` would check it before its stages need it.

    Besides the schema (each pydantic error with its key path and config.py's wording): model.base must
    resolve (`resolve_source`: an alias, a local model folder or a .gguf file, checked offline; a hub id is
    accepted with a note), a local training, val or test file must pass the data reader's check (a supported
    file type, an existing file; relative paths are read from the UI's working directory, as `llamatailor
    run` started by the UI reads them), and the name must not be taken in `runs_root` unless `resume`.
    These run on each part that is valid on its own, so they are listed beside the schema's problems.
    """
    try:
        config: RunConfig | None = RunConfig.model_validate({**value, SERVER_SET: str(runs_root)})
        problems: list[FieldError] = []
    except ValidationError as exc:
        config, problems = None, [_field_error(error) for error in exc.errors()]
    model: str | None = None
    notes: list[FieldError] = []
    section = _alone(ModelSection, value.get("model", {}))
    if section is not None:
        model, model_problems, notes = _model_check(section.base)
        problems += model_problems
    problems += [problem for field, item in _data_files(value) for problem in _file_problems(field, item)]
    name = value.get("name")
    name_valid = isinstance(name, str) and all(problem.field != "name" for problem in problems)
    taken = _taken(str(name), runs_root) if name_valid else []
    if taken and not resume:
        problems.append(_name_taken(str(name), taken))
    return FormCheck(config, problems, notes, model, bool(taken))


def _field_error(error: Any) -> FieldError:
    loc = tuple(str(part) for part in error["loc"] if part != "[key]")  # a mapping's bad key: its name
    return FieldError(".".join(_named_field(error, loc)) or "(top level)", describe_error(error, loc))


def _named_field(error: Any, loc: tuple[str, ...]) -> tuple[str, ...]:
    """Where the form shows a problem: `loc`, except for a section's own rule whose message opens with one
    of the section's keys alone ("save_steps (7) must be a multiple of eval_steps (5)"), which goes under
    that key's field; one naming keys together ("val_ratio + test_ratio is ...") stays on the section."""
    reason = error.get("ctx", {}).get("error") if error["type"] == "value_error" else None
    if reason is None or not isinstance(error.get("input"), dict):
        return loc
    words = str(reason).split(maxsplit=2)
    first = words[0].rstrip(":,;") if words else ""
    joined = len(words) > 1 and words[1] in ("+", "and", "or", "with")
    return (*loc, first) if first in allowed_keys(loc) and not joined else loc


def _alone(section: type[SectionT], raw: Any) -> SectionT | None:
    """`raw` as `section` where it is valid on its own, else None (the schema's problems name why)."""
    try:
        return section.model_validate(raw)
    except ValidationError:
        return None


def _model_check(base: str) -> tuple[str | None, list[FieldError], list[FieldError]]:
    """(model.base resolved, its problems, its notes): `resolve_source`'s verdict, the rule `prepare` and
    `plan` follow (a GGUF file is converted once, as they would)."""
    # Imported here: it imports torch, which the UI's other pages do not need to start.
    from llamatailor.models.source import resolve_source

    try:
        source = resolve_source(base)
    except ModelLoadError as exc:
        return None, [FieldError(MODEL_FIELD, str(exc).removeprefix(f"{MODEL_FIELD}: "))], []
    notes = [FieldError(MODEL_FIELD, HUB_NOTE)] if source.kind == "hub" else []
    return source.location, [], notes


def _data_files(value: dict[str, Any]) -> Iterator[tuple[str, DataFile]]:
    """(field path, input) of each local input of the form's data splits that is valid on its own."""
    data = value.get("data")
    if not isinstance(data, dict):
        return
    for split in SPLITS:
        items = data.get(split)
        for index, raw in enumerate(items if isinstance(items, list) else []):
            item = _alone(DataFile, raw)
            if item is not None and item.path is not None:
                yield f"data.{split}.{index}.path", item


def _file_problems(field: str, item: DataFile) -> list[FieldError]:
    if item.path == Path():  # pydantic reads an empty path as "."
        return [FieldError(field, "give the file's path")]
    try:
        checked_path(item)  # the reader's own rule: a supported file type, then an existing file
    except DataError as exc:
        return [FieldError(field, str(exc))]
    return []


def _taken(name: str, runs_root: Path) -> list[Path]:
    return [path for path in (runs_root / f"{name}.yaml", runs_root / name) if path.exists()]


def _name_taken(name: str, taken: list[Path]) -> FieldError:
    return FieldError(
        "name",
        f"a run named {name!r} exists ({', '.join(str(path) for path in taken)}): choose another name, "
        f"or resume it from its page (/runs/{name}/job)",
    )


def write_run_file(config: RunConfig, runs_root: Path, replace: bool) -> Path:
    """Write the form's checked run file (with output_dir: `runs_root`) as YAML to `<runs_root>/<name>.yaml`,
    atomically, with its paths absolute as `RunConfig.resolved` makes them for a run's config.yaml: each data
    file, a local model.base and model.chat_template where the form (and the run the UI starts, from the
    same working directory) found them, so a Resume from a UI started elsewhere, or `llamatailor run` from
    another folder, reads the same files.

    Raises FormConflict when that file exists and `replace` is false: it is never overwritten silently
    (written beside it, then linked into place, which fails where the name is taken).
    """
    name = config.name
    path = runs_root / f"{name}.yaml"
    value = {**config.resolved(), SERVER_SET: str(runs_root)}
    text = yaml.safe_dump(value, sort_keys=False, allow_unicode=True)
    runs_root.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".yaml.tmp", dir=runs_root)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        if replace:
            Path(temporary).replace(path)
        else:
            os.link(temporary, path)
    except FileExistsError:
        raise FormConflict(f"{path} exists; it is not overwritten (resume the run from its page)") from None
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def plan_verdict(config: RunConfig, gpu_mem_gib: float, model: str | None = None) -> dict[str, Any]:
    """`llamatailor plan`'s verdict for this run on one GPU of `gpu_mem_gib` GiB, for the page: the chosen
    method's fit in a sentence, each method's total and memory terms in GiB (`number`'s 4 significant
    digits), the recommendation and the advice. `model`: model.base already resolved (FormCheck.model;
    None: the planner resolves it). Raises LlamatailorError (ConfigError, ModelLoadError) for a model the
    planner cannot size, naming it."""
    # Imported here: the planner imports torch, which the UI's other pages do not need to start.
    from llamatailor.plan.memory import GIB
    from llamatailor.plan.options import build_plan
    from llamatailor.plan.verdict import plan_as_dict

    plan = plan_as_dict(build_plan(config, model=model, gpu_mem_gib=gpu_mem_gib, gpus=1, sharding="none"))
    if model not in (
        None,
        config.model.base,
    ):  # as `plan` names it: an alias's converted folder means nothing
        plan["model"] = config.model.base
    method = config.train.method
    methods = {
        label: {
            "label": label,
            "fits": fit["fits"],
            "total_gib": number(fit["total_bytes"] / GIB),
            "terms_gib": {term: number(size / GIB) for term, size in fit["terms_bytes"].items()},
            "max_micro_batch": fit["max_micro_batch"],
            "max_seq_len": fit["max_seq_len"],
        }
        for label, fit in plan["methods"].items()
    }
    return {
        "model": plan["model"],
        "parameters": plan["parameters"],
        "gpu_gib": number(gpu_mem_gib),
        "method": method,
        "fits": methods[method]["fits"],
        "verdict": _verdict(methods[method], plan["recommended"], number(gpu_mem_gib)),
        "recommended": plan["recommended"],
        "advice": plan["advice"],
        "methods": list(methods.values()),
    }


def _verdict(chosen: dict[str, Any], recommended: str | None, gpu: str) -> str:
    """One sentence: whether the chosen method fits (its total and the GPU's size, GiB), and what fits."""
    method, total = chosen["label"], chosen["total_gib"]
    if chosen["fits"]:
        sentence = f"{method} fits: {total} GiB of {gpu} GiB"
    else:
        sentence = f"{method} does not fit: {total} GiB needed, {gpu} GiB available"
    if recommended is None:
        return f"{sentence}; no method fits one such GPU"
    return sentence if recommended == method else f"{sentence}; {recommended} fits"
