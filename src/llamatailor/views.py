"""Rich renderings of stage results for the terminal (the CLI prints them; nothing here prints).

The CLI prints a view with `crop=False`: lines marked `no_wrap` (file:line references) stay whole.
"""

import functools
from dataclasses import replace
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from llamatailor.config import RunConfig
from llamatailor.data.prepare import PrepareResult
from llamatailor.evaluate.report import metric_rows
from llamatailor.evaluate.result import EvalResult
from llamatailor.export.merge import MergeResult
from llamatailor.export.stage import ExportResult
from llamatailor.plan.memory import expert_lora_rank
from llamatailor.plan.verdict import Plan
from llamatailor.train.dpo import DpoResult
from llamatailor.train.sft import TrainResult


def prepare_view(result: PrepareResult) -> RenderableType:
    table = Table(title="Prepared data", show_edge=False)
    for column in ("kind", "split", "samples", "tokens min", "median", "p95", "max", "truncated"):
        table.add_column(column, justify="left" if column in ("kind", "split") else "right")
    for kind in ("sft", "preference"):
        for name, stats in result.report["tokens"][kind].items():
            if kind == "preference" and not stats["count"]:
                continue
            cells = [str(stats.get(key, "-")) for key in ("min", "median", "p95", "max")]
            table.add_row(
                kind, name, str(stats["count"]), *cells, str(result.report["truncated"][kind][name])
            )
    rejected = Text(f"rejected: {result.rejected}", style="yellow" if result.rejected else "green")
    if result.rejected:
        kinds = ", ".join(f"{kind} {count}" for kind, count in result.rejected_by_kind.items())
        rejected.append(f" ({kinds}; all of them with their records in data/rejected.jsonl)")
    pii = result.report["pii"]
    found = ", ".join(f"{kind} in {count} records" for kind, count in pii["records"].items())
    checks = Text(f"PII ({pii['mode']}): {found or 'none found'}", style="yellow" if found else "default")
    # unwrapped, so that file:line stays whole
    first = [Text(f"  {line}", no_wrap=True, overflow="ignore") for line in result.first_rejections]
    return Group(table, rejected, checks, *first)


def train_view(result: TrainResult) -> RenderableType:
    share = 100 * result.trainable_parameters / max(result.total_parameters, 1)
    lines = [
        f"{result.method}: {result.steps} steps in {result.seconds:.0f} s ({result.precision}, {result.processes} process"
        + ("es)" if result.processes > 1 else ")")
        + (f", resumed from {result.resumed_from}" if result.resumed_from else ""),
        f"trainable parameters: {result.trainable_parameters:,} of {result.total_parameters:,} ({share:.2f}%)",
        f"loss: {_fmt(result.first_loss)} -> {_fmt(result.last_loss)}; best val loss: {_fmt(result.eval_loss)}",
        f"planned peak memory: {result.planned_peak_bytes / 2**30:.2f} GiB per device"
        if result.planned_peak_bytes
        else "",
        f"saved: {result.output}",
    ]
    return Group(Text("\n".join(line for line in lines if line)), *_warnings(result.warnings))


def dpo_view(result: DpoResult) -> RenderableType:
    lines = [
        f"dpo: {result.steps} steps in {result.seconds:.0f} s ({result.precision})"
        + (f", resumed from {result.resumed_from}" if result.resumed_from else ""),
        f"loss: {_fmt(result.first_loss)} -> {_fmt(result.last_loss)}; best val loss: {_fmt(result.eval_loss)}",
        f"chosen-over-rejected reward margin: {_fmt(result.first_margin)} -> {_fmt(result.last_margin)}",
        f"saved: {result.output}",
    ]
    return Group(Text("\n".join(lines)), *_warnings(result.warnings))


def _warnings(warnings: list[str]) -> list[Text]:
    return [Text(f"warning: {warning}", style="yellow") for warning in warnings]


def eval_view(result: EvalResult, show: int) -> RenderableType:
    parts: list[RenderableType] = []
    for sample in result.samples[:show]:
        answers = Table(show_header=False, show_edge=False, box=None, padding=(0, 1))
        answers.add_column(style="bold")
        answers.add_column(overflow="fold")
        answers.add_row("prompt", sample["prompt"])
        answers.add_row("reference", sample["reference"])
        answers.add_row("base", Text(sample["base"], style="red"))
        answers.add_row("tuned", Text(sample["tuned"], style="green"))
        parts += [answers, Text("")]
    table = Table(title=f"Held-out test set ({result.metrics['tuned']['count']} samples)", show_edge=False)
    for column in ("metric", "base", "tuned", "delta"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, base, tuned in metric_rows(result.metrics):
        if isinstance(base, float) and isinstance(tuned, float):
            style = "bold" if name == result.headline else None
            table.add_row(name, f"{base:.3f}", f"{tuned:.3f}", f"{tuned - base:+.3f}", style=style)
    training = result.training
    if "verdict" in training:
        parts.append(
            Text(
                f"training curves: {training['verdict']}",
                style="yellow" if training["verdict"] == "overfitting" else "dim",
            )
        )
    headline = result.headline
    base_score, tuned_score = result.metrics["base"][headline], result.metrics["tuned"][headline]
    verdict = Text(
        f"score ({headline}): base {base_score:.3f} -> tuned {tuned_score:.3f}",
        style="bold green" if tuned_score > base_score else "bold red",
    )
    return Group(*parts, table, verdict, Text(f"report: {result.folder / 'report.md'}"))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def plan_view(plan: Plan) -> RenderableType:
    setup = plan.setup
    shapes = (
        f"sequence {setup.seq_len}, micro-batch {setup.micro_batch}, {setup.precision}, gradient checkpointing "
        f"{'on' if setup.gradient_checkpointing else 'off'}, optimizer {setup.optimizer}, LoRA r={setup.lora_r} on "
        f"{', '.join(setup.lora_targets)}, {setup.gpus} device(s), sharding {setup.sharding}"
    )
    if plan.arch.experts:
        expert_r = expert_lora_rank(plan.arch, replace(setup, method="lora"))  # auto resolved as train does
        adapted = f"LoRA r={expert_r} per expert" if setup.lora_experts else "frozen"
        held = f"{setup.expert_bits}-bit (linearized, as Axolotl)" if setup.expert_bits else setup.precision
        shapes += f"; routed experts {adapted}, under qlora {held}"
    verdict = Text(
        f"recommended: {plan.recommended}" if plan.recommended else "recommended: nothing fits as planned",
        style="bold green" if plan.recommended else "bold red",
    )
    return Group(
        _plan_training_table(plan),
        Text(shapes, style="dim"),
        verdict,
        *(Text(f"- {line}") for line in plan.advice),
        _plan_inference_table(plan),
    )


def _plan_training_table(plan: Plan) -> Table:
    gib = 2**30
    active = f", {plan.arch.active_params() / 1e9:.2f}B active" if plan.arch.experts else ""
    table = Table(
        title=f"{plan.arch.name} ({plan.arch.total_params() / 1e9:.2f}B parameters{active}): peak training "
        f"memory per {'GPU' if plan.setup.device == 'cuda' else 'CPU process'}, GiB",
        show_edge=False,
    )
    table.add_column("term")
    for fit in plan.methods:
        table.add_column(
            fit.label + (" (4-bit)" if fit.label == "qlora" and fit.setup.bits == 4 else ""), justify="right"
        )
    parts = list(dict.fromkeys(name for fit in plan.methods for name in fit.breakdown.weight_terms))
    for term in plan.methods[0].breakdown.terms():
        table.add_row(term, *(f"{fit.breakdown.terms()[term] / gib:.2f}" for fit in plan.methods))
        if term == "weights" and plan.arch.experts:  # a MoE model's weights, part by part
            for part in parts:
                sizes = (fit.breakdown.weight_terms.get(part, 0) / gib for fit in plan.methods)
                table.add_row(f"  {part}", *(f"{size:.2f}" for size in sizes), style="dim")
        if term == "optimizer states" and plan.setup.lora_experts and plan.arch.experts:
            sizes = (fit.breakdown.expert_optimizer / gib for fit in plan.methods)
            table.add_row("  of the experts' LoRA", *(f"{size:.2f}" for size in sizes), style="dim")
    table.add_row(
        "trainable parameters", *(f"{fit.breakdown.trainable_parameters:,}" for fit in plan.methods)
    )
    table.add_row("peak total", *(f"{fit.breakdown.total / gib:.2f}" for fit in plan.methods), style="bold")
    table.add_row(
        f"fits in {plan.memory / gib:.1f} GiB",
        *(Text("yes", style="green") if fit.fits else Text("no", style="red") for fit in plan.methods),
    )
    table.add_row("largest micro-batch", *(str(fit.max_micro_batch) for fit in plan.methods))
    table.add_row("longest sequence", *(f"{fit.max_seq_len:,}" for fit in plan.methods))
    table.add_row("GPUs needed (FSDP)", *(str(fit.gpus_needed or ">64") for fit in plan.methods))
    return table


def _plan_inference_table(plan: Plan) -> Table:
    gib = 2**30
    context = plan.inference[0].breakdown.context if plan.inference else 0
    # int4/int8, then the compute precision: fp32 on CPU, where "16 bits" would undercount twice over
    labels = [
        f"int{f.breakdown.bits}" if f.breakdown.bits < 16 else plan.setup.precision for f in plan.inference
    ]
    table = Table(
        title=f"serving {plan.arch.name}: weights in {', '.join(labels)}, KV cache of {context:,} tokens "
        f"({plan.setup.precision}), GiB",
        show_edge=False,
    )
    table.add_column("term")
    for label in labels:
        table.add_column(label, justify="right")
    for label, term in (("weights", "weights"), ("KV cache", "kv_cache"), ("overhead", "overhead")):
        sizes = (getattr(fit.breakdown, term) / gib for fit in plan.inference)
        table.add_row(label, *(f"{size:.2f}" for size in sizes))
    table.add_row("total", *(f"{fit.breakdown.total / gib:.2f}" for fit in plan.inference), style="bold")
    table.add_row(
        f"fits in {plan.memory / gib:.1f} GiB",
        *(Text("yes", style="green") if fit.fits else Text("no", style="red") for fit in plan.inference),
    )
    table.add_row("devices needed", *(str(fit.gpus_needed or ">64") for fit in plan.inference))
    return table


def merge_view(result: MergeResult) -> RenderableType:
    return Text(
        f"merged into {result.folder} ({result.dtype}): max |logit| difference to the adapter model "
        f"{result.max_abs_logit_diff:.2e} (saved and reloaded: {result.saved_max_abs_logit_diff:.2e}, "
        f"allowed {result.saved_tolerance:.2e}; tolerance {result.tolerance:.0e}); greedy answers identical on "
        f"{result.greedy_identical} of "
        f"{result.greedy_compared} val prompts",
        style="green",
    )


def export_view(result: ExportResult) -> RenderableType:
    table = Table(title=f"GGUF files in {result.folder}, checked by llama.cpp against the merged model")
    for column in ("type", "MiB", "same ids", "top-1", "Δ perplexity (gate)", result.headline, "stops"):
        table.add_column(column, justify="left" if column == "type" else "right")
    for row in result.files:
        gate = f" (≤{row['gate_pct']}%)" if row["gate_pct"] is not None else ""
        retention = f" ({100 * row['retention']:.1f}%)" if row["retention"] is not None else ""
        table.add_row(
            row["gguf_type"],
            f"{row['size_mb']:.0f}",
            f"{row['tokenizer_texts'] - row['tokenizer_mismatches']}/{row['tokenizer_texts']}",
            f"{100 * row['top1_agreement']:.1f}%",
            f"{row['perplexity_increase_pct']:+.2f}%{gate}",
            f"{_fmt(row['task_metric'])}{retention}",
            "yes" if row["chat_finish_reason"] == "stop" else "[red]no[/]",
        )
    lines: list[RenderableType] = [table]
    if result.files:
        first = result.files[0]
        lines.append(
            Text(
                f"merged model: {result.headline} {_fmt(first['task_metric_merged'])} on the test prompts, "
                f"answer perplexity {first['perplexity_merged']:.3f} on val; (x%) = retention"
            )
        )
    template = (
        "equal to the training template" if result.modelfile_template else "none, Ollama reads the GGUF's"
    )
    lines.append(Text(f"{result.modelfile}: TEMPLATE {template}"))
    lines += [Text(f"FAILED {failure}", style="bold red") for failure in result.failures]
    return Group(*lines)


@functools.singledispatch
def stage_view(result: Any, config: RunConfig) -> RenderableType:
    """What the CLI prints for a stage's result, chosen by the result's type; `config` gives the display
    settings (`eval.show`: how many answers to print). Raises TypeError for a type with no view."""
    raise TypeError(f"no view for a {type(result).__name__}")


stage_view.register(PrepareResult, lambda result, config: prepare_view(result))
stage_view.register(TrainResult, lambda result, config: train_view(result))
stage_view.register(DpoResult, lambda result, config: dpo_view(result))
stage_view.register(EvalResult, lambda result, config: eval_view(result, config.eval.show))
stage_view.register(MergeResult, lambda result, config: merge_view(result))
stage_view.register(ExportResult, lambda result, config: export_view(result))
