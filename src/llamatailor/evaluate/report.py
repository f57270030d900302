"""`eval/report.md` and `eval/scores.png`: base vs tuned side by side, with deltas, probes and examples."""

from pathlib import Path
from typing import Any

from llamatailor.evaluate.result import EvalResult
from llamatailor.plots import plot_score_pairs

SHOWN_EXAMPLES = 3
# Lower is better for these; the report marks which way each delta goes.
LOWER_IS_BETTER = ("perplexity", "runaway_share", "memorised_share", "judge_unparsed")


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def metric_rows(metrics: dict[str, dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """(name, base, tuned) for every metric; per-field dictionaries are flattened."""
    rows: list[tuple[str, Any, Any]] = []
    for name, base_value in metrics["base"].items():
        if isinstance(base_value, dict):
            # The same scoring made both models' metrics: a field set in base is one in tuned.
            tuned_fields = metrics["tuned"][name]
            rows.extend((f"{name}.{key}", base_value[key], tuned_fields[key]) for key in base_value)
        else:
            rows.append((name, base_value, metrics["tuned"].get(name)))
    return rows


def _delta(name: str, base: Any, tuned: Any) -> str:
    if not isinstance(base, float) or not isinstance(tuned, float):
        return ""
    change = tuned - base
    better = change < 0 if any(key in name for key in LOWER_IS_BETTER) else change > 0
    return f"{change:+.3f} {'better' if better else 'worse' if change else ''}".rstrip()


def _table(metrics: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| metric | base | tuned | delta |", "|---|---:|---:|---|"]
    lines += [
        f"| {name} | {_number(b)} | {_number(t)} | {_delta(name, b, t)} |"
        for name, b, t in metric_rows(metrics)
    ]
    return lines


def _block(title: str, text: str) -> list[str]:
    fence = "````" if "```" in text else "```"
    return [f"{title}:", "", f"{fence}text", text, fence, ""]


def _example(sample: dict[str, Any]) -> list[str]:
    return [
        *_block("Prompt", sample["prompt"]),
        *_block("Reference", sample["reference"]),
        *_block(f"Base ({sample['base_score']:.2f})", sample["base"]),
        *_block(f"Tuned ({sample['tuned_score']:.2f})", sample["tuned"]),
        "---",
        "",
    ]


def render_report(name: str, result: EvalResult) -> str:
    """`eval/report.md` (Markdown): the metrics table, the training verdict, per-group tables, and the
    best and worst tuned answers."""
    lines = [f"# Evaluation of run `{name}`", "", f"Tuned model: `{result.tuned_source}`", ""]
    lines += [f"Headline metric: **{result.headline}**", "", *_table(result.metrics), ""]
    training = result.training
    lines += ["## Training curves", ""]
    if "best_step" in training:
        lines.append(
            f"{training['verdict']}: best val loss {training['best_val_loss']:.4f} at step {training['best_step']}, "
            f"last {training['last_val_loss']:.4f} at step {training['last_step']} ({training['val_rise_after_best']:+.1%})."
        )
    else:
        lines.append(f"{training.get('verdict', 'unknown')}: {training.get('reason', '')}")
    lines += ["", "![scores](scores.png)", ""]
    for value, by_model in result.groups.items():
        lines += [f"## Group `{value}`", "", *_table(by_model), ""]
    ranked = sorted(result.samples, key=lambda sample: sample["tuned_score"])
    lines += ["## Best tuned answers", ""]
    for sample in reversed(ranked[-SHOWN_EXAMPLES:]):
        lines += _example(sample)
    lines += ["## Worst tuned answers", ""]
    for sample in ranked[:SHOWN_EXAMPLES]:
        lines += _example(sample)
    return "\n".join(lines)


def plot_scores(samples: list[dict[str, Any]], path: Path) -> None:
    plot_score_pairs([s["base_score"] for s in samples], [s["tuned_score"] for s in samples], path)
