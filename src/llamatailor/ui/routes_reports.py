"""A run's Data page (data/report.json and the rejected records, paged and filtered) and Export page
(gguf/export_report.json: the retention table, every gate with its value and limit, the Modelfile, the merge
checks)."""

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from llamatailor.ui.pages import render
from llamatailor.ui.reports import NOT_JSON, PER_PAGE, load_data, load_export
from llamatailor.ui.settings import runs_of

router = APIRouter()


@router.get("/runs/{name}/data", response_class=HTMLResponse)
def data_page(
    request: Request, name: str, kind: str = "", q: str = "", page: Annotated[int, Query(ge=1)] = 1
) -> HTMLResponse:
    """The data report of run `name` and page `page` (PER_PAGE records; past the last: the last) of its
    rejected records, filtered by rejection `kind` (any text: a kind the file lacks matches nothing) and by
    `q`, a text their reason, file or record holds. 400 for a page that is not a number from 1."""
    data = load_data(runs_of(request), name, kind, q, page)
    links = {}
    if data.rejections is not None:
        links = page_links(
            f"/runs/{name}/data", {"kind": kind, "q": q}, data.rejections.page, data.rejections.pages
        )
    return render(
        request,
        "data.html",
        name=name,
        section="data",
        data=data,
        kind=kind,
        q=q,
        links=links,
        per_page=PER_PAGE,
        not_json=NOT_JSON,
    )


def page_links(path: str, query: dict[str, str], shown: int, pages: int) -> dict[str, str]:
    """URLs of the first, previous, next and last pages around page `shown` of `pages`, keeping the filter
    `query` (its empty values left out); a page that is the shown one or does not exist has no link."""
    kept = {key: value for key, value in query.items() if value}
    links = {}
    for label, number in (("first", 1), ("previous", shown - 1), ("next", shown + 1), ("last", pages)):
        if 1 <= number <= pages and number != shown:
            links[label] = f"{path}?" + urlencode({**kept, "page": number})
    return links


@router.get("/runs/{name}/export", response_class=HTMLResponse)
def export_page(request: Request, name: str) -> HTMLResponse:
    """The export report of run `name`: per GGUF file its retention numbers and gates, the failures, the
    Modelfile, the LoRA GGUF check and the merge checks, each when present."""
    return render(
        request, "export.html", name=name, section="export", export=load_export(runs_of(request), name)
    )
