"""The runs page, a run's overview page (stages, config, live training curves), the comparison page, and
the JSON and file routes behind them."""

import dataclasses
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse

from llamatailor.ui.pages import render
from llamatailor.ui.runs import STAGE_NAMES, read_json, read_manifest, read_metrics, stage_rows, summarize_run
from llamatailor.ui.settings import runs_of

router = APIRouter()

# The runs page's sortable columns: the query's `sort` value, the summary's attribute.
SortKey = Literal["name", "status", "created_at", "updated_at", "seconds", "base_model", "method", "delta"]
SORT_KEYS: tuple[str, ...] = get_args(SortKey)
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "text/plain"}


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request, sort: SortKey = "updated_at", desc: bool = True) -> HTMLResponse:
    """Every run under the runs folder, one row each, sorted by `sort` (a SORT_KEYS name), descending when
    `desc`; other values answer 400 (`pages.invalid_request`)."""
    runs = runs_of(request)
    summaries = [summarize_run(runs.run(name)) for name in runs.run_names()]
    present = [row for row in summaries if getattr(row, sort) is not None]
    present.sort(key=lambda row: getattr(row, sort), reverse=desc)
    rows = present + [row for row in summaries if getattr(row, sort) is None]
    return render(
        request, "runs.html", runs=rows, stages=STAGE_NAMES, sort=sort, desc=desc, folder=str(runs.root)
    )


@router.get("/runs/{name}", response_class=HTMLResponse)
def run_page(request: Request, name: str) -> HTMLResponse:
    """A run's stages (status, time, error), its resolved config and its training curves (live)."""
    run = runs_of(request).run(name)
    manifest = read_manifest(run)
    config_text = run.config.read_text(encoding="utf-8", errors="replace") if run.config.is_file() else None
    return render(
        request,
        "run.html",
        name=name,
        summary=summarize_run(run, manifest),
        stages=stage_rows(manifest),
        manifest=manifest.fields,
        config_text=config_text,
        has_loss_plot=run.loss_plot.is_file(),
        section="overview",
    )


@router.get("/compare", response_class=HTMLResponse)
def compare_page(request: Request, run: Annotated[list[str] | None, Query()] = None) -> HTMLResponse:
    """Runs side by side: their loss curves overlaid (drawn from /api/runs/NAME/metrics) and a table of
    every eval metric of their tuned models."""
    runs = runs_of(request)
    names = list(dict.fromkeys(run or []))
    metrics = {name: read_json(runs.run(name).eval / "metrics.json") or {} for name in names}
    keys = sorted({key for m in metrics.values() for key, v in (m.get("tuned") or {}).items() if _scalar(v)})
    return render(request, "compare.html", names=names, metrics=metrics, keys=keys)


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@router.get("/api/runs")
def runs_json(request: Request) -> list[dict[str, Any]]:
    """The runs page's rows as JSON (summary fields plus `status` and `delta`)."""
    runs = runs_of(request)
    rows = []
    for name in runs.run_names():
        summary = summarize_run(runs.run(name))
        rows.append({**dataclasses.asdict(summary), "status": summary.status, "delta": summary.delta})
    return rows


@router.get("/api/runs/{name}/metrics")
def metrics_json(
    request: Request, name: str, source: Literal["sft", "dpo"] = "sft", offset: int = 0, line: int = 1
) -> dict[str, Any]:
    """SFT's metrics.jsonl (or DPO's dpo/metrics.jsonl) rows from byte `offset` (line number `line`):
    {rows, offset, line, bad_lines, bad_values, status, stages, problems}: `bad_values` lists the values
    left out of their rows for not being numbers ({line, key, value}). A page polls it with the returned
    offset and line to follow a run while it trains."""
    run = runs_of(request).run(name)
    path = run.metrics if source == "sft" else run.dpo / "metrics.jsonl"
    chunk = read_metrics(path, max(offset, 0), max(line, 1))
    manifest = read_manifest(run)  # once per poll: the summary and the stage rows both come from it
    summary = summarize_run(run, manifest)
    return {
        "rows": chunk.rows,
        "offset": chunk.offset,
        "line": chunk.line,
        "bad_lines": chunk.bad_lines,
        "bad_values": chunk.bad_values,
        "status": summary.status,
        "stages": stage_rows(manifest),
        "problems": summary.problems,
    }


@router.get("/runs/{name}/files/{relative:path}")
def run_file(request: Request, name: str, relative: str) -> FileResponse:
    """A file of the run (images inline; anything else as plain text, never as HTML). 404 for a path that
    leads outside the runs folder."""
    path = runs_of(request).file(name, relative)
    media_type = IMAGE_TYPES.get(path.suffix.lower(), "text/plain; charset=utf-8")
    return FileResponse(path, media_type=media_type)
