"""Probes for known failure modes: answers that never stop, memorised training text, overfitting."""

from pathlib import Path
from typing import Any

from llamatailor.generation.text import Generation
from llamatailor.rundir import read_jsonl


def runaway_share(generations: list[Generation]) -> float:
    """Share of answers that ran to max_new_tokens without the end-of-turn token."""
    return sum(not g.stopped for g in generations) / max(len(generations), 1)


def ngrams(ids: list[int], size: int) -> set[tuple[int, ...]]:
    return {tuple(ids[i : i + size]) for i in range(len(ids) - size + 1)}


class MemorisationProbe:
    """Finds answers that repeat `size` or more consecutive tokens of some training answer verbatim."""

    def __init__(self, training_answers: list[list[int]], size: int) -> None:
        self.size = size
        self.seen: set[tuple[int, ...]] = set()
        for ids in training_answers:
            self.seen |= ngrams(ids, size)

    def memorised(self, answer: list[int]) -> bool:
        return any(gram in self.seen for gram in ngrams(answer, self.size))

    def share(self, answers: list[list[int]]) -> float:
        return sum(map(self.memorised, answers)) / max(len(answers), 1)


def overfitting_verdict(metrics: Path) -> dict[str, Any]:
    """From the training log: the best validation loss against the last, and what train loss did meanwhile."""
    if not metrics.is_file():
        return {"verdict": "unknown", "reason": "no training log"}
    rows = read_jsonl(metrics)
    evals = [(row["step"], row["eval_loss"]) for row in rows if "eval_loss" in row]
    trains = [(row["step"], row["loss"]) for row in rows if "loss" in row]
    if len(evals) < 2:
        return {"verdict": "unknown", "reason": "fewer than two validation losses"}
    best_step, best = min(evals, key=lambda item: item[1])
    last_step, last = evals[-1]
    train_at_best = _at_or_before(trains, best_step)
    train_last = trains[-1][1] if trains else None
    rise = (last - best) / best if best else 0.0
    overfitting = (
        rise > 0.05 and train_last is not None and train_at_best is not None and train_last < train_at_best
    )
    return {
        "verdict": "overfitting" if overfitting else "no overfitting",
        "best_step": best_step,
        "best_val_loss": best,
        "last_step": last_step,
        "last_val_loss": last,
        "val_rise_after_best": rise,
        "train_loss_at_best": train_at_best,
        "train_loss_last": train_last,
    }


def _at_or_before(series: list[tuple[int, float]], step: int) -> float | None:
    earlier = [value for at, value in series if at <= step]
    return earlier[-1] if earlier else None
