"""Stage contracts: each stage reads no config key and no file beyond what it declares beside its code;
`llamatailor run` reruns exactly the stages a change reaches; `llamatailor --help` loads no model library.

The drift test runs every stage of a tiny run once while recording what the stage's code actually reads:
config keys through a recorder on the config's sections (attribute reads, and the copies, dumps and
resolved trees made from them), files through an audit hook on Python's "open" event and, on Linux, inotify
(native code: safetensors, tokenizers and llama.cpp open files without a Python event). Left out, by rule:
`name` and `output_dir` (they say where the run directory is: a new value is a new run, not a rerun), the
files a stage creates itself (outputs, spools, temporaries, checkpoints), and files outside the test's folder
and the base model's folder (libraries, caches). The base model's files are named by the key `model.base`.
"""

import ctypes
import dataclasses
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from helpers import write_jsonl, write_run_file
from llamatailor import __version__
from llamatailor.cli import app
from llamatailor.config import Section, load_config
from llamatailor.pipeline import STAGE_BY_NAME, STAGES, run_stage, stages_to_run

RUN_IDENTITY = {"name", "output_dir"}
# Which stages read what another writes (the run directory contract), for the reruns a change must reach.
READERS = {
    "prepare": {"train", "dpo", "eval", "merge", "export"},
    "train": {"dpo", "eval", "merge"},
    "dpo": {"eval", "merge"},
    "eval": set(),
    "merge": {"export"},
    "export": set(),
}
# One change per declared key (a leaf under a declared section); every declared key must have one here.
CHANGES = {
    "seed": ["seed=8"],
    "model": ["model.family=chatml"],
    "data": ["data.dedup.threshold=0.9"],
    "data.max_seq_len": ["data.max_seq_len=100"],
    "data.system_prompt": ["data.system_prompt=Be brief."],
    "train": ["train.learning_rate=0.02"],
    "train.method": ["train.method=qlora"],
    "train.quantization": ["train.quantization.bits=8"],
    "train.gradient_checkpointing": ["train.gradient_checkpointing=true"],
    "dpo": ["dpo.beta=0.2"],
    "dpo.enabled": ["dpo.enabled=false"],
    "eval.max_new_tokens": ["eval.max_new_tokens=5"],
    "eval.batch_size": ["eval.batch_size=2"],
    "eval.max_samples": ["eval.max_samples=3"],
    "eval.json_fields": ["eval.json_fields=[answer]"],
    "eval.semantic": ["eval.semantic=true"],
    "eval.perplexity": ["eval.perplexity=false"],
    "eval.memorisation_tokens": ["eval.memorisation_tokens=16"],
    "eval.group_by": ["eval.group_by=language"],
    "eval.judge": ["eval.judge.base_url=http://127.0.0.1:9/v1", "eval.judge.model=judge"],
    "export.merge_dtype": ["export.merge_dtype=bf16"],
    "export.merge_tolerance": ["export.merge_tolerance=0.01"],
    "export.check_samples": ["export.check_samples=4"],
    "export.gguf": ["export.gguf=[f16, q8_0]"],
    "export.gates": ["export.gates={f16: 5}"],
    "export.modelfile_from": ["export.modelfile_from=f16"],
    "export.lora_gguf": ["export.lora_gguf=true"],
}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class ConfigReads:
    """The config keys read while `active`, seen through `Section.__getattribute__` (installed by `installed`).

    Sections are known by the path they were reached by from the tracked RunConfig. A copy (`model_copy`)
    keeps its original's path, less the fields its `update` replaced; `model_dump` reads the whole section,
    `section_hash(*keys)` those keys, and `resolved()` returns a dict that records the keys looked up in it.
    """

    current: "ConfigReads | None" = None

    def __init__(self, config: Section) -> None:
        self.paths: dict[int, tuple[Any, str, frozenset[str]]] = {id(config): (config, "", frozenset())}
        self.keys: set[str] = set()
        self.active = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active

    def seen(self, section: Any, name: str, value: Any) -> Any:
        entry = self.paths.get(id(section))
        if not self.active or entry is None or entry[0] is not section:
            return value
        _, path, replaced = entry
        key = _join(path, name)
        if name in type(section).model_fields:
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, BaseModel) and id(item) not in self.paths:
                    self.paths[id(item)] = (item, key, frozenset())
            if name not in replaced and (isinstance(value, list) or not isinstance(value, BaseModel)):
                self.keys.add(key)
            return value
        return self._method(name, value, path, replaced)

    def _method(self, name: str, method: Any, path: str, replaced: frozenset[str]) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            with self.paused():
                result = method(*args, **kwargs)
            if name == "model_copy":
                update = frozenset(kwargs.get("update") or ())
                self.paths[id(result)] = (result, path, replaced | update)
            elif name in ("model_dump", "model_dump_json"):
                self.keys.add(path)
            elif name == "section_hash":
                self.keys.update(_join(path, key) for key in args)
            elif name == "resolved":
                return ReadDict(result, path, self.keys)
            return result

        return (
            call
            if name in ("model_copy", "model_dump", "model_dump_json", "section_hash", "resolved")
            else method
        )

    @staticmethod
    @contextmanager
    def installed(reads: "ConfigReads") -> Iterator[None]:
        def getattribute(section: Any, name: str) -> Any:
            value = object.__getattribute__(section, name)
            if ConfigReads.current is None or name.startswith("_"):
                return value
            return ConfigReads.current.seen(section, name, value)

        ConfigReads.current = reads
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Section, "__getattribute__", getattribute, raising=False)
            try:
                yield
            finally:
                ConfigReads.current = None


class ReadDict(dict):
    """A resolved config tree that records the keys read from it: a value looked up, or a whole subtree
    when it is iterated."""

    def __init__(self, data: dict[str, Any], path: str, keys: set[str]) -> None:
        super().__init__(data)
        self.path, self.keys = path, keys

    def __getitem__(self, name: str) -> Any:
        value = super().__getitem__(name)
        if isinstance(value, dict):
            return ReadDict(value, _join(self.path, name), self.keys)
        self.keys.add(_join(self.path, name))
        return value

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def _whole(self, method: Callable[[], Any]) -> Any:
        self.keys.add(self.path)
        return method()

    def items(self) -> Any:
        return self._whole(super().items)

    def values(self) -> Any:
        return self._whole(super().values)

    def __iter__(self) -> Any:
        return self._whole(super().__iter__)


class FileReads:
    """Files opened while `active`: Python's audit "open" events (the hook stays for the process: audit
    hooks cannot be removed) and, on Linux, inotify's IN_OPEN in the watched folders."""

    IN_OPEN, IN_Q_OVERFLOW, IN_ISDIR = 0x20, 0x4000, 0x40000000

    def __init__(self) -> None:
        self.active = False
        self.python: set[str] = set()
        self.libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC) if self.libc else -1
        self.folders: dict[int, Path] = {}
        sys.addaudithook(self.hook)

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.active and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            self.python.add(os.fsdecode(args[0]))

    def watch(self, *roots: Path) -> None:
        if self.fd < 0:
            return
        for root in roots:
            for folder in [root, *(path for path in root.rglob("*") if path.is_dir())]:
                wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), self.IN_OPEN)
                assert wd >= 0, f"inotify cannot watch {folder}: errno {ctypes.get_errno()}"
                self.folders[wd] = folder

    def native(self) -> set[Path]:
        found: set[Path] = set()
        while self.fd >= 0:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16 : offset + 16 + length].rstrip(b"\0")
                offset += 16 + length
                assert not mask & self.IN_Q_OVERFLOW, "inotify's queue overflowed: opens were lost"
                if name and not mask & self.IN_ISDIR and wd in self.folders:
                    found.add(self.folders[wd] / os.fsdecode(name))
        return found

    def close(self) -> None:
        """Stop watching (the audit hook stays, idle)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @contextmanager
    def recording(self, *roots: Path) -> Iterator[set[Path]]:
        """Yields the set that holds, on exit, the resolved paths opened inside the block."""
        opened: set[Path] = set()
        self.watch(*roots)
        self.native()  # what was opened before the block
        self.python.clear()
        self.active = True
        try:
            yield opened
        finally:
            self.active = False
            opened.update(Path(path).resolve() for path in self.python)
            opened.update(path.resolve() for path in self.native())


def _clear_caches() -> None:
    """Empty every functools cache in the package, so a stage reads what an earlier stage already loaded."""
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("llamatailor"):
            for value in list(vars(module).values()):
                if callable(getattr(value, "cache_clear", None)) and callable(
                    getattr(value, "cache_info", None)
                ):
                    value.cache_clear()


@dataclasses.dataclass
class Observed:
    keys: set[str]
    files: set[Path]  # opened, and there before the stage started


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, tiny_models):
    """Every stage of a tiny run (SFT taught to answer "ok" and stop, DPO, eval, merge, export to f16), each
    run by `run_stage` with its action recorded; returns the run file, the base folder and what each read."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("contracts")
    base = tiny_models["chatml"]
    template = folder / "template.jinja"
    template.write_text(AutoTokenizer.from_pretrained(base).chat_template, encoding="utf-8")
    sft = [
        {"messages": [{"role": "user", "content": f"Question {n}?"}, {"role": "assistant", "content": "ok"}]}
        for n in range(30)
    ]
    prefs = [{"prompt": f"Query {n}?", "chosen": "ok", "rejected": "no"} for n in range(10)]
    run_file = write_run_file(
        folder,
        base,
        [write_jsonl(folder / "sft.jsonl", sft), write_jsonl(folder / "prefs.jsonl", prefs)],
        train={"max_steps": 12, "batch_size": 8, "learning_rate": 3e-2, "save_steps": 100},
        dpo={"enabled": True, "max_steps": 1, "batch_size": 4, "learning_rate": 1e-5, "save_steps": 100},
        eval={"max_new_tokens": 4, "json_fields": None, "semantic": False},
        export={"gguf": ["f16"]},
    )
    raw = yaml.safe_load(run_file.read_text(encoding="utf-8"))
    raw["model"]["chat_template"] = str(template)  # the template file is an input too
    run_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    config = load_config(run_file)
    reads, files = ConfigReads(config), FileReads()
    observed: dict[str, Observed] = {}

    def recorded(action: Callable[..., Any], name: str) -> Callable[..., Any]:
        def action_recorded(config: Any, **options: Any) -> Any:
            _clear_caches()
            there = {path.resolve() for root in (folder, base) for path in root.rglob("*") if path.is_file()}
            reads.keys = set()
            with files.recording(folder, base) as opened:
                reads.active = True
                try:
                    result = action(config, **options)
                finally:
                    reads.active = False
            observed[name] = Observed(reads.keys, opened & there)
            return result

        return action_recorded

    with ConfigReads.installed(reads):
        for stage in STAGES:
            run_stage(dataclasses.replace(stage, action=recorded(stage.action, stage.name)), config)
    files.close()
    return run_file, base, observed


def _covered(key: str, declared: tuple[str, ...]) -> bool:
    return any(key == part or key.startswith(part + ".") for part in declared)


@pytest.mark.parametrize("name", [stage.name for stage in STAGES])
def test_stage_reads_only_what_it_declares(recorded_run, name):
    run_file, base, observed = recorded_run
    stage, config, seen = STAGE_BY_NAME[name], load_config(run_file), observed[name]
    assert seen.keys and seen.files, "the recorders saw nothing: they cannot be trusted"
    undeclared_keys = {key for key in seen.keys - RUN_IDENTITY if not _covered(key, stage.config_keys)}
    assert not undeclared_keys, f"{name} reads config keys it does not declare: {sorted(undeclared_keys)}"
    declared = {path.resolve() for path in stage.inputs(config)}
    in_base = {path for path in seen.files if path.is_relative_to(base.resolve())}
    assert not in_base or _covered("model.base", stage.config_keys), f"{name} reads {in_base}"
    undeclared_files = seen.files - in_base - declared
    assert not undeclared_files, (
        f"{name} reads files it does not declare: {sorted(map(str, undeclared_files))}"
    )


def test_recorders_see_python_and_native_opens_and_keys(recorded_run):
    """What each stage is known to read shows up: the checks above can fail."""
    run_file, base, observed = recorded_run
    run = load_config(run_file).run_dir
    assert run.root.parent.parent / "template.jinja" in observed["prepare"].files  # Python's open
    assert run.data_report.resolve() in observed["train"].files  # planned peak memory reads it
    assert (run.dpo / "adapter" / "adapter_model.safetensors").resolve() in observed[
        "eval"
    ].files  # safetensors
    assert (base / "model.safetensors").resolve() in observed["merge"].files
    assert {"data.max_seq_len", "eval.batch_size"} <= observed["merge"].keys
    assert "eval.perplexity" not in observed["export"].keys  # export sets it on its own copy
    assert {"seed", "train.method"} <= observed["dpo"].keys


def _expected(config: Any, direct: set[str]) -> list[str]:
    reached, todo = set(direct), list(direct)
    while todo:
        for reader in READERS[todo.pop()] - reached:
            reached.add(reader)
            todo.append(reader)
    return [stage.name for stage in STAGES if stage.name in reached and stage.enabled(config)]


def test_every_declared_key_has_a_change():
    declared = {key for stage in STAGES for key in stage.config_keys}
    assert declared == CHANGES.keys()


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_a_changed_key_reruns_the_stages_it_reaches(recorded_run, key):
    run_file, _, _ = recorded_run
    assert stages_to_run(load_config(run_file)) == [], "the recorded run is complete"
    changed = load_config(run_file, CHANGES[key])
    leaves = [override.partition("=")[0] for override in CHANGES[key]]
    direct = {
        s.name for s in STAGES if s.enabled(changed) and any(_covered(leaf, s.config_keys) for leaf in leaves)
    }
    assert direct, f"{leaves} reach no stage"
    assert [stage.name for stage in stages_to_run(changed)] == _expected(changed, direct)


def test_a_changed_input_file_reruns_the_stages_it_reaches(recorded_run):
    run_file, _, _ = recorded_run
    config = load_config(run_file)
    readers: dict[Path, set[str]] = {}
    for stage in STAGES:
        for path in stage.inputs(config):
            readers.setdefault(path, set()).add(stage.name)
    assert len(readers) > 20
    for path, direct in readers.items():
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        try:
            assert [stage.name for stage in stages_to_run(config)] == _expected(config, direct), path
        finally:
            path.write_bytes(original)
    assert stages_to_run(config) == []


def test_run_skips_a_complete_run_and_shows_its_evaluation(recorded_run):
    """A key no stage reads (eval.show) reruns nothing; the skipped eval still shows its results."""
    run_file, _, _ = recorded_run
    result = CliRunner().invoke(app, ["run", str(run_file), "eval.show=1"])
    assert result.exit_code == 0, result.output
    assert result.output.count("up to date for this config and inputs, skipped") == len(STAGES)
    assert result.output.count("reference") == 1 and "Held-out test set" in result.output


def _command_names() -> list[str]:
    return [command.name or command.callback.__name__ for command in app.registered_commands]


@pytest.mark.parametrize("option", ["--help", "--version"])
def test_help_and_version_load_no_model_library(option):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "llamatailor", option],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "llamatailor.cli" in imported
    heavy = {name for name in imported if name.split(".")[0] in ("torch", "transformers", "pydantic")}
    assert not heavy, f"{option} imported {sorted(heavy)[:5]}"
    if option == "--help":
        for name in _command_names():
            assert f" {name} " in result.stdout, name
    else:
        assert result.stdout.strip() == f"llamatailor {__version__}"
