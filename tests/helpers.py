"""Helpers for tests: data files and run files."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import yaml
from openai import OpenAI

from llamatailor.data.templating import IGNORE_INDEX


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def alpaca_rows(count: int, start: int = 0) -> list[dict[str, str]]:
    """Small, distinct Alpaca records: name a number's successor, as JSON."""
    return [
        {
            "instruction": "Give the next number as JSON.",
            "input": f"n = {n}",
            "output": json.dumps({"next": n + 1}),
        }
        for n in range(start, start + count)
    ]


def write_run_file(
    folder: Path, model: Path | str, train_files: list[Path], **sections: dict[str, Any]
) -> Path:
    """A run file for a quick run on a tiny model; `sections` replace or extend the defaults."""
    config: dict[str, Any] = {
        "name": "tiny",
        "output_dir": str(folder / "runs"),
        "seed": 7,
        "model": {"base": str(model)},
        "data": {
            "train": [str(p) for p in train_files],
            "val_ratio": 0.2,
            "test_ratio": 0.2,
            "max_seq_len": 128,
        },
        "train": {
            "max_steps": 4,
            "batch_size": 4,
            "learning_rate": 5e-3,
            "logging_steps": 1,
            "save_steps": 2,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        },
        "eval": {"max_new_tokens": 8, "batch_size": 4, "json_fields": ["next"]},
        "export": {"gguf": []},  # random tiny models never stop, so export's gates would fail them
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values} if isinstance(values, dict) else values
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def conversation(user: str, answer: str) -> dict[str, Any]:
    """An OpenAI-messages record."""
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def prepared_run(folder: Path, model: Path | str, rows: list[dict[str, Any]], **sections: Any) -> Path:
    """A run file over `rows` whose data is already prepared (in-process); returns the run file."""
    from llamatailor.config import load_config
    from llamatailor.data.prepare import prepare

    folder.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(folder / "train.jsonl", rows)
    run_file = write_run_file(folder, model, [data], **sections)
    prepare(load_config(run_file))
    return run_file


KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, target: Path, *options: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "llamatailor",
            "serve",
            str(target),
            "--port",
            str(self.port),
            *options,
        ]
        self.log = log
        self.process = subprocess.Popen(
            command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ.copy()
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not start: {log.read_text()}")

    def client(self, key: str | None = KEY) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def labelled_runs(labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive labelled tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def generated(backend: Any, job: Any) -> list[Any]:
    """Every delta a serve backend generates for `job` (serve.backend.Job), in order."""
    import asyncio

    async def collect() -> list[Any]:
        return [delta async for delta in backend.answer(job)]

    return asyncio.run(collect())
