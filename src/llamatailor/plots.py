"""PNG plots for reports (matplotlib, Agg backend: no display needed)."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from llamatailor.rundir import atomic_path


def _save(figure: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def plot_lengths(lengths: dict[str, list[int]], path: Path) -> None:
    """Token-length histogram per split."""
    figure, axes = plt.subplots(figsize=(7, 3.5))
    for name, values in lengths.items():
        if values:
            axes.hist(values, bins=40, alpha=0.6, label=f"{name} ({len(values)})")
    axes.set_xlabel("tokens per sample (chat template applied)")
    axes.set_ylabel("samples")
    if any(lengths.values()):
        axes.legend()
    _save(figure, path)


def plot_loss(rows: list[dict[str, Any]], path: Path) -> None:
    """Training loss (and validation loss where logged) against the optimiser step."""
    figure, axes = plt.subplots(figsize=(7, 3.5))
    train = [(row["step"], row["loss"]) for row in rows if "loss" in row]
    val = [(row["step"], row["eval_loss"]) for row in rows if "eval_loss" in row]
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss")
    if val:
        axes.plot(*zip(*val, strict=True), marker="o", label="val loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    if train or val:
        axes.legend()
    _save(figure, path)


def plot_score_pairs(base: list[float], tuned: list[float], path: Path) -> None:
    """Per-example scores of the base and the tuned model, each sorted: the gap is the gain."""
    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.plot(sorted(base), label="base", color="tab:red")
    axes.plot(sorted(tuned), label="tuned", color="tab:green")
    axes.set_xlabel("test examples, sorted by score")
    axes.set_ylabel("score per example")
    if base or tuned:
        axes.legend()
    _save(figure, path)
