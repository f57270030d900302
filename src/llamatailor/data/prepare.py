"""The `prepare` stage: data files -> canonical conversations, rendered and checked, split, reported.

Bad records never stop the stage: each goes to `data/rejected.jsonl` with its file, line, field and
reason, and the good ones go on. Every accepted sample was rendered with the run's chat template, so
training cannot meet a sample whose answer is truncated away.
"""

import hashlib
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamatailor.config import DataSection, RunConfig
from llamatailor.data.formats import Message, RecordError, to_conversation
from llamatailor.data.reader import detect_file_format, read_records
from llamatailor.data.split import split_records
from llamatailor.data.templating import RenderError, render_for_training
from llamatailor.models.loading import ChatTokenizer, load_tokenizer
from llamatailor.plots import plot_lengths
from llamatailor.rundir import write_json, write_jsonl

SPLITS = ("train", "val", "test")
SHOWN_REJECTIONS = 5


@dataclass(frozen=True)
class Example:
    id: str
    source: str
    messages: list[Message]
    tokens: int
    truncated: bool

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "messages": self.messages}


@dataclass
class FileResult:
    path: Path
    split: str
    format: str
    examples: list[Example] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class PrepareResult:
    splits: dict[str, int]
    rejected: int
    rejected_by_kind: dict[str, int]
    first_rejections: list[str]  # "file:line: field: reason", the first few
    truncated: int
    report: dict[str, Any]


def prepare(config: RunConfig, chat: ChatTokenizer | None = None) -> PrepareResult:
    chat = chat or load_tokenizer(config.model)
    files = [
        read_file(path, split, chat, config.data) for split in SPLITS for path in getattr(config.data, split)
    ]
    splits = assign_splits(files, config)
    rejected = [row for result in files for row in result.rejected]
    run = config.run_dir
    for name in SPLITS:
        write_jsonl(run.split(name), (example.row() for example in splits[name]))
    write_jsonl(run.rejected, rejected)
    report = build_report(files, splits, rejected, chat, config.data)
    write_json(run.data_report, report)
    plot_lengths(
        {name: [e.tokens for e in examples] for name, examples in splits.items()}, run.data / "lengths.png"
    )
    return PrepareResult(
        splits={name: len(examples) for name, examples in splits.items()},
        rejected=len(rejected),
        rejected_by_kind=report["rejected"]["by_kind"],
        first_rejections=[describe_rejection(row) for row in rejected[:SHOWN_REJECTIONS]],
        truncated=sum(report["truncated"].values()),
        report=report,
    )


def read_file(path: Path, split: str, chat: ChatTokenizer, data: DataSection) -> FileResult:
    fmt = detect_file_format(path)
    result = FileResult(path, split, fmt.name)
    for record in read_records(path):
        if record.error is not None:
            result.rejected.append(_rejection(record.where, "unreadable", record.error, record.raw))
            continue
        try:
            messages = with_system_prompt(to_conversation(record.value, fmt), data.system_prompt)
            sample = render_for_training(chat, messages, data.max_seq_len)
        except RecordError as exc:
            result.rejected.append(_rejection(record.where, "invalid", exc, record.value))
            continue
        except RenderError as exc:
            result.rejected.append(
                _rejection(record.where, "unrenderable", RecordError("", str(exc)), record.value)
            )
            continue
        result.examples.append(
            Example(conversation_id(messages), record.where, messages, sample.full_length, sample.truncated)
        )
    return result


def with_system_prompt(messages: list[Message], system_prompt: str | None) -> list[Message]:
    if system_prompt is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def conversation_id(messages: list[Message]) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def _rejection(where: str, kind: str, error: RecordError, record: Any) -> dict[str, Any]:
    return {"source": where, "kind": kind, "field": error.field, "reason": error.reason, "record": record}


def describe_rejection(row: dict[str, Any]) -> str:
    field = f"{row['field']}: " if row["field"] else ""
    return f"{row['source']}: {field}{row['reason']}"


def assign_splits(files: list[FileResult], config: RunConfig) -> dict[str, list[Example]]:
    """Explicit val/test files are used as given; otherwise those splits are drawn from the train files."""
    by_split = {name: [e for f in files if f.split == name for e in f.examples] for name in SPLITS}
    data = config.data
    drawn = split_records(
        by_split["train"],
        val_ratio=0.0 if data.val else data.val_ratio,
        test_ratio=0.0 if data.test else data.test_ratio,
        seed=config.seed,
    )
    return {
        "train": drawn["train"],
        "val": by_split["val"] if data.val else drawn["val"],
        "test": by_split["test"] if data.test else drawn["test"],
    }


def build_report(
    files: list[FileResult],
    splits: dict[str, list[Example]],
    rejected: list[dict[str, Any]],
    chat: ChatTokenizer,
    data: DataSection,
) -> dict[str, Any]:
    return {
        "files": [
            {
                "path": str(f.path),
                "split": f.split,
                "format": f.format,
                "accepted": len(f.examples),
                "rejected": len(f.rejected),
            }
            for f in files
        ],
        "splits": {name: len(examples) for name, examples in splits.items()},
        "rejected": {"total": len(rejected), "by_kind": dict(Counter(row["kind"] for row in rejected))},
        "tokens": {name: length_stats([e.tokens for e in examples]) for name, examples in splits.items()},
        "truncated": {name: sum(e.truncated for e in examples) for name, examples in splits.items()},
        "max_seq_len": data.max_seq_len,
        "family": chat.family.name,
        "chat_template": chat.template_origin,
    }


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {"count": 0}
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "count": len(ordered),
        "min": ordered[0],
        "median": statistics.median(ordered),
        "p95": p95,
        "max": ordered[-1],
        "total": sum(ordered),
    }
