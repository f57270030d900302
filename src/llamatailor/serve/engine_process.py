"""An engine's own HTTP server (llama.cpp's `llama-server`, vLLM's OpenAI server) as a child process on
127.0.0.1: started with its log in a folder of its own, ready once its /health answers 200, stopped with its
whole process group (vLLM's engine and workers too), and stopped by the kernel if this process is killed."""

import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

from llamatailor.errors import ModelLoadError

log = logging.getLogger(__name__)


def stop_with_parent() -> None:
    """Run in the child before it starts (Popen's preexec_fn): on Linux the child gets SIGTERM when this
    process dies, even when it is killed, so no engine outlives its server (prctl PR_SET_PDEATHSIG)."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


class EngineProcess:
    """`name` says which engine in messages; `folder` (the caller's, e.g. with files the command names) holds
    the log and is deleted by `stop`. Raises ModelLoadError when the process exits before it is ready or is
    not ready within `start_timeout_s` (with its exit code and the last lines of its log)."""

    def __init__(
        self, name: str, command: list[str], port: int, folder: Path, start_timeout_s: float
    ) -> None:
        self.name, self.folder, self.log_path = name, folder, folder / "server.log"
        self.url = f"http://127.0.0.1:{port}"
        log.info("starting %s (log: %s)", shlex.join(command), self.log_path)
        with self.log_path.open("wb") as out:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=stop_with_parent,
            )
        try:
            self._wait_ready(start_timeout_s)
        except BaseException:  # Ctrl-C while it starts too: nothing left running, no folder left
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                code, tail = self.process.returncode, self.log_tail()
                self.stop()
                raise ModelLoadError(f"{self.name} exited with {code} while starting:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    log.info("%s ready in %.1f s", self.name, time.monotonic() - started)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        tail = self.log_tail()
        self.stop()
        raise ModelLoadError(f"{self.name} did not answer within {timeout_s:.0f} s:\n{tail}")

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM to the process group, SIGKILL after `timeout_s`; then the folder is deleted. Safe to call
        twice."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
