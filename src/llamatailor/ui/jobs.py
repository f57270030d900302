"""The `llamatailor run` processes this UI started: each in its own session (a process group the UI can
signal as a whole, which outlives the UI), its output appended to `<run>/ui-run.log`.

Stopping follows a terminal's Ctrl-C: SIGINT to the group (the trainer stops between steps and
`pipeline.run_stage` records the stage failed), then SIGTERM after STOP_GRACE[0] seconds and SIGKILL after
STOP_GRACE[1] if anything of the group is left (`Jobs.stop_grace`). The job records each signal it sent (and
writes a line saying so into the run's log), and its label names the signal that ended the process. A run
started elsewhere is seen through its manifest: a stage recorded running by a live process
(`runs.stage_state`).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamatailor.errors import LlamatailorError
from llamatailor.rundir import RunDir, now_iso
from llamatailor.ui.paths import STARTED_LOG
from llamatailor.ui.runs import read_manifest, stage_state

STOP_GRACE = (10.0, 20.0)  # seconds after the SIGINT: SIGTERM, then SIGKILL
LOG_NAME = STARTED_LOG
LOG_CHUNK = 256 * 1024  # bytes a log poll returns at most; the page asks again at once for the rest
# The log follows the run line by line (no buffering), and rich, which wraps text that goes to a file at 80
# columns, fills the page's width.
LOG_ENVIRONMENT = {"PYTHONUNBUFFERED": "1", "COLUMNS": "160"}


class JobConflict(LlamatailorError):
    """A start while the run is running (here or elsewhere), or a stop with nothing of this UI's running."""


@dataclass
class Job:
    """One `llamatailor run` this UI started. `pid` is also its process group's id (start_new_session)."""

    name: str
    run_file: Path
    log: Path
    process: subprocess.Popen[bytes]
    started_at: str
    stop_asked: float | None = None  # time.monotonic() of the stop
    stop_asked_at: str | None = None
    signals_sent: list[str] = field(default_factory=list)  # by the stop, in order: SIGINT, SIGTERM, SIGKILL

    @property
    def pid(self) -> int:
        """The `llamatailor run` process's id, also its process group's."""
        return self.process.pid

    @property
    def exit_code(self) -> int | None:
        """The process's exit status (negative: the signal that ended it), None while it runs."""
        return self.process.poll()

    @property
    def state(self) -> str:
        """running, stopping, stopped (ended after a stop), finished (exit 0) or failed."""
        code = self.exit_code
        if code is None:
            return "running" if self.stop_asked is None else "stopping"
        if self.stop_asked is not None:
            return "stopped"
        return "finished" if code == 0 else "failed"

    @property
    def ended_by(self) -> str | None:
        """The signal that ended the process (SIGTERM, ...), None while it runs or when it exited itself."""
        code = self.exit_code
        if code is None or code >= 0:
            return None
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"

    def as_dict(self) -> dict[str, Any]:
        """The job for JSON: state, pid, start and stop times (ISO 8601), exit code, the signal that ended
        it, the signals the stop sent, run file."""
        return {
            "state": self.state,
            "pid": self.pid,
            "started_at": self.started_at,
            "stop_asked_at": self.stop_asked_at,
            "exit_code": self.exit_code,
            "ended_by": self.ended_by,
            "signals_sent": list(self.signals_sent),
            "run_file": str(self.run_file),
        }

    def send(self, signum: signal.Signals, when: str, why: str = "") -> bool:
        """Send `signum` to the job's process group, record it, and say so in the run's log (`=== WHEN:
        SIGNAL sent to the run's processes WHY`); nothing if the group has ended. Whether it was sent."""
        if not signal_group(self.pid, signum):
            return False
        self.signals_sent.append(signum.name)
        self.note(f"{when}: {signum.name} sent to the run's processes{why}")
        return True

    def note(self, text: str) -> None:
        """Append the line `=== TEXT` to the run's log, so that the log the page shows tells what the UI did
        to the run beside what the run printed (appended as the run's own output is: lines keep their
        order)."""
        try:
            with self.log.open("ab") as handle:
                handle.write(f"\n=== {text}\n".encode())
        except OSError:
            pass  # a log that cannot be written must not keep the signal from being sent


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is left that has not ended (one of another user's counts as
    alive). A zombie, ended but not yet reaped, does not count: in a container whose init reaps no orphans
    a run's ended child would otherwise keep its group "alive" for good. Linux: read from /proc."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():
        return True
    return any(state != "Z" for group, state in process_groups(proc) if group == pgid)


def process_groups(proc: Path) -> list[tuple[int, str]]:
    """(process group, state letter) of every process in `proc` (/proc/PID/stat: the fields after the
    command's closing parenthesis, state first, then the parent, then the group)."""
    found = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        found.append((int(fields[2]), fields[0]))
    return found


def signal_group(pgid: int, signum: int) -> bool:
    """Send `signum` to process group `pgid`; False (nothing sent) if it has ended."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:  # ended meanwhile
        return False
    return True


def outside_pid(run: RunDir, own: set[int]) -> int | None:
    """The pid of a process running a stage of `run` (manifest record, alive on this host) that is not one
    of `own` (this UI's jobs), else None."""
    for record in read_manifest(run).stages.values():
        pid = record.get("pid")
        if isinstance(pid, int) and pid not in own and stage_state(record) == "running":
            return pid
    return None


@dataclass
class Jobs:
    """The jobs of one UI, by run name (the newest per run); kept in `UiSettings.services`."""

    jobs: dict[str, Job] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop_grace: tuple[float, float] = STOP_GRACE  # seconds after a stop's SIGINT: SIGTERM, then SIGKILL

    def get(self, name: str) -> Job | None:
        """The newest job of run `name` this UI started, running or not; None if none."""
        return self.jobs.get(name)

    def pids(self) -> set[int]:
        """The process ids of every job this UI started."""
        return {job.pid for job in self.jobs.values()}

    def start(self, name: str, run_file: Path, run: RunDir) -> Job:
        """Start `python -m llamatailor run RUN_FILE output_dir=<runs folder> name=<run>` in its own session
        (so it writes into `run` only, whatever the file says), output appended to
        `<run>/ui-run.log` after a header line. Training stages resume from their newest checkpoint (`run`'s
        default). Raises JobConflict while a job of this name runs here, or a stage of it runs elsewhere."""
        with self.lock:
            self.refuse_running(name, run)
            run.root.mkdir(parents=True, exist_ok=True)
            log = run.root / LOG_NAME
            # Whatever the run file says, the run writes into this run directory and nowhere else (a copied
            # run's config.yaml still names the folder it was made in). JSON strings are YAML strings.
            overrides = [
                f"output_dir={json.dumps(str(run.root.parent))}",
                f"name={json.dumps(run.root.name)}",
            ]
            command = [sys.executable, "-m", "llamatailor", "run", str(run_file), *overrides]
            started_at = now_iso()
            with log.open("ab") as handle:
                handle.write(f"\n=== {started_at} llamatailor ui started: {' '.join(command)}\n".encode())
                handle.flush()
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**os.environ, **LOG_ENVIRONMENT},
                )
            job = Job(name, run_file, log, process, started_at)
            self.jobs[name] = job
            return job

    def refuse_running(self, name: str, run: RunDir) -> None:
        """Raise JobConflict, naming the pid, while a job of this name runs here or a stage of `run` runs
        elsewhere."""
        job = self.jobs.get(name)
        if job is not None and job.exit_code is None:
            raise JobConflict(f"run {name!r} is already running (pid {job.pid}); stop it first")
        pid = outside_pid(run, self.pids())
        if pid is not None:
            raise JobConflict(
                f"run {name!r} is running outside this UI (pid {pid}); wait for it or stop it where it runs"
            )

    def view(self, name: str, run: RunDir) -> dict[str, Any]:
        """The page's view of run `name`'s process: this UI's job (`Job.as_dict`), else `elsewhere` with the
        pid of a process running one of its stages, else `idle`; `label` says it in words."""
        job = self.jobs.get(name)
        if job is not None:
            view = job.as_dict()
            code = "" if view["exit_code"] is None else f", exit code {view['exit_code']}"
            if view["ended_by"]:
                code = f", ended by {view['ended_by']}"
            return {**view, "label": f"{view['state']} (pid {job.pid}{code})"}
        pid = outside_pid(run, self.pids())
        if pid is not None:
            return {"state": "elsewhere", "pid": pid, "label": f"running outside this UI (pid {pid})"}
        return {"state": "idle", "label": "not running"}

    def stop(self, name: str) -> Job:
        """SIGINT to the job's process group, then SIGTERM and SIGKILL at the `stop_grace` marks (seconds
        after the SIGINT) while any of it is left. Raises JobConflict when this UI runs no job of that
        name."""
        with self.lock:
            job = self.jobs.get(name)
            if job is None or job.exit_code is not None:
                raise JobConflict(f"this UI runs no job for {name!r}: nothing to stop")
            if job.stop_asked is None:
                job.stop_asked, job.stop_asked_at = time.monotonic(), now_iso()
                job.send(signal.SIGINT, f"stop asked at {job.stop_asked_at}", " (as Ctrl-C)")
                threading.Thread(target=_escalate, args=(job, self.stop_grace), daemon=True).start()
            return job


def _escalate(job: Job, grace: tuple[float, float]) -> None:
    """Wait for the group to end after the SIGINT; SIGTERM, then SIGKILL, at the `grace` marks (seconds
    after the SIGINT)."""
    assert job.stop_asked is not None
    for mark, signum in zip(grace, (signal.SIGTERM, signal.SIGKILL), strict=True):
        while time.monotonic() < job.stop_asked + mark:
            job.process.poll()  # reaps the leader: a zombie would count as a group member
            if not group_alive(job.pid):
                return
            time.sleep(0.2)
        job.send(signum, now_iso(), f": some were still there {mark:g} s after the SIGINT")
    job.process.poll()


@dataclass(frozen=True)
class LogChunk:
    """Log text from a byte offset: `offset` to ask from next; `reset` when the file was shorter than asked
    (replaced), so the text starts again from its beginning; `more` when there is more to read now."""

    text: str
    offset: int
    reset: bool
    more: bool


def read_log(path: Path | None, offset: int) -> LogChunk:
    """Up to LOG_CHUNK bytes of `path` from `offset` (None or missing: empty), decoded as UTF-8; a
    character cut at the end of what was written is left for the next call."""
    try:
        size = path.stat().st_size if path is not None else 0
    except OSError:
        size = 0
    reset = size < offset
    start = 0 if reset else offset
    if path is None or size <= start:
        return LogChunk("", start, reset, False)
    with path.open("rb") as handle:
        handle.seek(start)
        data = handle.read(min(size - start, LOG_CHUNK))
    for cut in range(4):  # a UTF-8 character is at most 4 bytes: up to 3 may be missing their end
        try:
            text = data[: len(data) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return LogChunk(text, start + len(data) - cut, reset, start + len(data) < size)
    return LogChunk(
        data.decode("utf-8", errors="replace"), start + len(data), reset, start + len(data) < size
    )
