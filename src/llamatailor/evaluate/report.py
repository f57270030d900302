"""`eval/report.md` and `eval/scores.png`: base vs tuned side by side, with deltas, probes and examples."""

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamatailor.plots import plot_score_pairs

if TYPE_CHECKING:
    from llamatailor.evaluate.stage import EvalResult

SHOWN_EXAMPLES = 3
# Lower is better for these; the report marks which way each delta goes.
LOWER_IS_BETTER = ("perplexity", "runaway_share", "memorised_share", "judge_unparsed")


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def metric_rows(metrics: dict[str, dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """(name, base, tuned) for every metric; per-field dictionaries are flattened."""
    rows = []
    for name, base_value in metrics["base"].items():
        tuned_value = metrics["tuned"].get(name)
        if isinstance(base_value, dict):
            rows.extend((f"{name}.{key}", base_value[key], tuned_value[key]) for key in base_value)
        else:
            rows.append((name, base_value, tuned_value))
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


def render_report(name: str, result: "EvalResult") -> str:
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
