"""`eval/report.md`: base vs tuned side by side, with deltas and a few answers."""

from typing import Any

SHOWN_SAMPLES = 5


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def metric_rows(metrics: dict[str, dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """(name, base, tuned) for every scalar metric; per-field dictionaries are flattened."""
    rows = []
    for name, base_value in metrics["base"].items():
        tuned_value = metrics["tuned"][name]
        if isinstance(base_value, dict):
            rows.extend((f"{name}.{key}", base_value[key], tuned_value[key]) for key in base_value)
        else:
            rows.append((name, base_value, tuned_value))
    return rows


def render_report(name: str, metrics: dict[str, dict[str, Any]], headline: str, samples: list[dict]) -> str:
    lines = [f"# Evaluation of run `{name}`", "", f"Headline metric: **{headline}**", ""]
    lines += ["| metric | base | tuned | delta |", "|---|---:|---:|---:|"]
    for metric, base, tuned in metric_rows(metrics):
        delta = f"{tuned - base:+.3f}" if isinstance(base, float) else ""
        lines.append(f"| {metric} | {_number(base)} | {_number(tuned)} | {delta} |")
    lines += ["", "## Sample answers", ""]
    for sample in samples[:SHOWN_SAMPLES]:
        lines += [
            f"### {sample['id']}",
            "",
            f"**Prompt:** {sample['prompt']}",
            "",
            f"- reference: `{sample['reference']}`",
            f"- base: `{sample['base']}`",
            f"- tuned: `{sample['tuned']}`",
            "",
        ]
    return "\n".join(lines)
