"""The runs folder the UI may read: every path the UI opens is resolved here and must stay inside it."""

import re
from dataclasses import dataclass
from pathlib import Path

from llamatailor.errors import LlamatailorError
from llamatailor.rundir import RunDir

# A run's name as a URL carries it: one folder name, no separators, no leading dot (hidden, `..`).
STARTED_LOG = "ui-run.log"  # what the UI writes first into a run it starts (ui/jobs.py)
RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class OutsideRunsFolder(LlamatailorError):
    """A requested path is not a file or folder inside the runs folder (`..`, an absolute path, a symlink
    leading out, a name that is not a run's)."""


@dataclass(frozen=True)
class RunsFolder:
    """The folder whose runs the UI shows (`llamatailor ui --runs`), resolved once.

    `run(name)` and `file(name, relative)` are the only ways the UI turns a request into a path: each
    resolves symlinks and refuses anything whose real location is not inside the runs folder.
    """

    root: Path

    @classmethod
    def at(cls, folder: Path) -> "RunsFolder":
        return cls(folder.expanduser().resolve())

    def run_names(self) -> list[str]:
        """Names of the run directories (folders holding a manifest.json, or the log of a run the UI just
        started), sorted; symlinked runs that lead out of the folder are left out."""
        if not self.root.is_dir():
            return []
        names = []
        for entry in self.root.iterdir():
            marked = (entry / "manifest.json").is_file() or (entry / STARTED_LOG).is_file()
            if RUN_NAME.match(entry.name) and marked and self._inside(entry):
                names.append(entry.name)
        return sorted(names)

    def run(self, name: str) -> RunDir:
        """The run directory `name` (a run just started may have no manifest.json yet). Raises
        OutsideRunsFolder for a name that is not one folder's name, no such folder, or one whose real path is
        outside the runs folder."""
        if not RUN_NAME.match(name):
            raise OutsideRunsFolder(f"{name!r} is not a run's name")
        folder = self.root / name
        if not self._inside(folder) or not folder.is_dir():
            raise OutsideRunsFolder(f"no run {name!r} in {self.root}")
        return RunDir(folder.resolve())

    def file(self, name: str, relative: str) -> Path:
        """A file inside run `name`, given by a path relative to the run directory. Raises OutsideRunsFolder
        for an absolute path, a `..` part, a symlink whose target is outside the runs folder, or no file."""
        run = self.run(name)
        parts = Path(relative).parts
        if not parts or Path(relative).is_absolute() or any(part in ("..", "") for part in parts):
            raise OutsideRunsFolder(f"{relative!r}: not a path inside run {name!r}")
        path = run.root.joinpath(*parts)
        if not self._inside(path) or not path.is_file():
            raise OutsideRunsFolder(f"{relative!r}: no such file in run {name!r}")
        return path.resolve()

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.root)
        except (OSError, RuntimeError):  # a symlink loop
            return False
