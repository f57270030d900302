"""What the eval stage returns and leaves in `eval/metrics.json`: read by the report, the views and the CLI."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: metrics per model, the headline metric's name, one row per test sample (prompt,
    reference, both answers and their scores), the eval folder, metrics per `eval.group_by` value, the
    training curves' verdict, and where the tuned model came from."""

    metrics: dict[str, dict[str, Any]]  # "base" and "tuned"
    headline: str
    samples: list[dict[str, Any]]
    folder: Path
    groups: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    tuned_source: str = ""
