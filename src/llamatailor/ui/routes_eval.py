"""A run's Eval page: metrics base vs tuned, the training verdict and failure probes, and every test sample
side by side with its differences from the reference, ordered, filtered and paged by query parameters."""

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from llamatailor.ui.eval_view import (
    FILTERS,
    ORDERS,
    Only,
    Order,
    candidates,
    load_eval,
    page_of,
    select_samples,
)
from llamatailor.ui.pages import render
from llamatailor.ui.runs import read_manifest, stage_state
from llamatailor.ui.settings import runs_of

router = APIRouter()


@router.get("/runs/{name}/eval", response_class=HTMLResponse)
def eval_page(
    request: Request,
    name: str,
    order: Order = "worst",
    only: Only = "all",
    page: Annotated[int, Query(ge=1)] = 1,
    candidate: str = "",
) -> HTMLResponse:
    """The eval results of run `name` (or of `candidate`, an `eval --model` evaluation). `order`: worst
    (tuned_score - base_score ascending), best, or file; `only`: all, regressions (tuned below base), or
    runaway (tuned answers that did not stop); `page`: 1-based, 25 samples a page (past the last: the last).
    404 for an unknown run; 400 for another order, filter or a page below 1 (`pages.invalid_request`)."""
    runs = runs_of(request)
    view = load_eval(runs, name, candidate)
    shown = page_of(select_samples(view.samples, order, only), page)
    stage = read_manifest(runs.run(name)).stages.get("eval")
    chosen = {"order": order, "only": only, "candidate": candidate}

    def query(**changes: object) -> str:
        """This page's query string with `changes` (page 1 unless given); empty values left out."""
        values = {**chosen, "page": 1, **changes}
        return "?" + urlencode({key: value for key, value in values.items() if value not in ("", None)})

    return render(
        request,
        "eval.html",
        name=name,
        section="eval",
        view=view,
        shown=shown,
        order=order,
        only=only,
        candidate=candidate,
        candidates=candidates(runs, name),
        stage={**stage, "state": stage_state(stage)} if isinstance(stage, dict) else None,
        query=query,
        orders=ORDERS,
        filters=FILTERS,
    )
