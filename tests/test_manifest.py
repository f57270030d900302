"""The run's manifest.json: a malformed one stops every command clearly and is never written over; each stage
record names the llamatailor source it ran on (the package's git checkout, not the working directory's)."""

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import write_jsonl
from llamatailor.cli import app
from llamatailor.config import load_config
from llamatailor.pipeline import PACKAGE_DIR, run_stage, source_revision
from llamatailor.stage_contract import Stage

GIT_USER = ["-c", "user.name=Test", "-c", "user.email=test@example.com"]
# A manifest cut short inside the prepare record's status.
CUT_SHORT = '{\n  "manifest_version": 1,\n  "stages": {\n    "prepare": {"status": "comp'


def tiny_run(tmp_path: Path) -> Path:
    """A run file with one data file, whose run directory holds a manifest (no stage has to run)."""
    data = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "ok"}]}],
    )
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        f"name: tiny\noutput_dir: {tmp_path / 'runs'}\ndata:\n  train: [{data}]\n", encoding="utf-8"
    )
    load_config(run_file).create_run_dir()
    return run_file


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        (CUT_SHORT, "not valid JSON (Unterminated string starting at: line 4 column 27 (char 67))"),
        ("[1, 2]\n", "is a JSON array, not an object"),
        ('{"stages": []}\n', "stages is a JSON array, not an object of stage records"),
        (
            '{"stages": {"prepare": "complete"}}\n',
            'stages.prepare is "complete", not a stage record (an object with a status)',
        ),
        (
            '{"stages": {"prepare": {"status": 7}, "train": {"seconds": 3}}}\n',
            "stages.prepare.status is 7, not a status word; stages.train has no status",
        ),
    ],
    ids=["cut-short", "a-list", "stages-a-list", "record-a-string", "two-bad-records"],
)
@pytest.mark.parametrize("command", [["run"], ["run", "--force"], ["prepare"]], ids=" ".join)
def test_a_malformed_manifest_is_a_clear_error_and_left_as_it_is(tmp_path, text, fault, command):
    run_file = tiny_run(tmp_path)
    manifest = tmp_path / "runs" / "tiny" / "manifest.json"
    manifest.write_text(text, encoding="utf-8")
    config_written = manifest.with_name("config.yaml")
    result = CliRunner().invoke(app, [command[0], str(run_file), *command[1:]])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    assert f"error: {manifest}: {fault}: it is this run's record of its stages" in result.output
    assert f"move it away (mv {manifest} {manifest}.broken) to start the run's record over" in result.output
    assert manifest.read_text(encoding="utf-8") == text
    assert not config_written.exists()  # the stage stopped before writing anything


def test_a_manifest_without_stages_reads_as_none_run(tmp_path):
    run = load_config(tiny_run(tmp_path)).run_dir
    run.manifest.write_text('{"name": "tiny"}', encoding="utf-8")
    assert run.stage_record("prepare") is None
    run.set_stage_record("prepare", {"status": "complete"})
    assert json.loads(run.manifest.read_text(encoding="utf-8"))["name"] == "tiny"


def git(folder: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), *GIT_USER, *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def new_repo(folder: Path, files: dict[str, str]) -> Path:
    """A git repository at `folder` with `files` committed."""
    folder.mkdir(parents=True, exist_ok=True)
    git(folder, "init", "-q")
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    git(folder, "add", "-A")
    git(folder, "commit", "-q", "-m", "start")
    return folder


def test_a_stage_records_the_package_checkout_not_the_working_directory(tmp_path, monkeypatch):
    if subprocess.run(
        ["git", "-C", str(PACKAGE_DIR), "ls-files", "--error-unmatch", "__init__.py"]
    ).returncode:
        pytest.skip("llamatailor is not running from a git checkout here")
    package_revision = git(PACKAGE_DIR, "rev-parse", "HEAD")
    package_dirty = bool(git(PACKAGE_DIR, "status", "--porcelain", "--", "."))
    project = new_repo(tmp_path / "project", {"notes.txt": "the user's own project\n"})
    assert git(project, "rev-parse", "HEAD") != package_revision
    monkeypatch.chdir(project)
    source_revision.cache_clear()
    config = load_config(tiny_run(tmp_path))
    earlier = {"status": "complete", "git_revision": "0" * 40, "git_dirty": False}
    config.run_dir.set_stage_record("prepare", earlier)
    probe = Stage("probe", config_keys=(), inputs=lambda c: [], outputs=lambda c: [], action=lambda c: None)
    run_stage(probe, config)
    manifest = config.run_dir.read_manifest()
    record = manifest["stages"]["probe"]
    assert (record["status"], record["git_revision"], record["git_dirty"]) == (
        "complete",
        package_revision,
        package_dirty,
    )
    assert manifest["stages"]["prepare"] == earlier  # a later stage does not re-label an earlier one
    assert (manifest["git_revision"], manifest["git_dirty"]) == (package_revision, package_dirty)


def test_source_revision_of_a_checkout_a_venv_and_a_plain_folder(tmp_path):
    package = {"src/pkg/__init__.py": "", "src/pkg/core.py": "x = 1\n", "README.md": "about\n"}
    checkout = new_repo(tmp_path / "checkout", package)
    folder = checkout / "src" / "pkg"
    revision = git(checkout, "rev-parse", "HEAD")
    source_revision.cache_clear()
    assert source_revision(folder) == {"git_revision": revision, "git_dirty": False}
    (checkout / "README.md").write_text("changed, but not the package\n", encoding="utf-8")
    source_revision.cache_clear()
    assert source_revision(folder) == {"git_revision": revision, "git_dirty": False}
    (folder / "new.py").write_text("y = 2\n", encoding="utf-8")  # untracked source is a change too
    source_revision.cache_clear()
    assert source_revision(folder) == {"git_revision": revision, "git_dirty": True}
    # An installed package inside the user's own repository (an ignored virtual environment) has no revision.
    project = new_repo(tmp_path / "project", {".gitignore": ".venv/\n"})
    installed = project / ".venv" / "site-packages" / "pkg"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("", encoding="utf-8")
    plain = tmp_path / "wheel" / "pkg"
    plain.mkdir(parents=True)
    (plain / "__init__.py").write_text("", encoding="utf-8")
    for untracked in (installed, plain):
        assert source_revision(untracked) == {"git_revision": None, "git_dirty": None}
