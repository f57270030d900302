"""An opt-in JSONL log of requests and answers for the feedback loop, with PII masked as `prepare` does."""

import json
import threading
import time
from pathlib import Path
from typing import Any

from llamatailor.data.pii import find_pii, mask_pii
from llamatailor.vocabulary import PII_KINDS


def masked(text: str) -> str:
    return mask_pii(text, find_pii(text, set(PII_KINDS)))


class RequestLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(
        self, kind: str, model: str, request: Any, answer: str, finish: str, prompt_tokens: int, tokens: int
    ) -> None:
        if isinstance(request, list):
            request = [{**message, "content": masked(message["content"])} for message in request]
        else:
            request = masked(str(request))
        row = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "object": kind,
            "model": model,
            "input": request,
            "output": masked(answer),
            "finish_reason": finish,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": tokens,
        }
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
