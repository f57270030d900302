"""The UI's HTML: Jinja2 templates shipped in the package, autoescaped (every value from a run's files is text,
never markup), and the number formats the pages share."""

import math
from pathlib import Path
from typing import Any

import jinja2
from fastapi.templating import Jinja2Templates
from starlette.requests import Request
from starlette.responses import HTMLResponse

UI_FOLDER = Path(__file__).parent
STATIC = UI_FOLDER / "static"


def number(value: Any, digits: int = 4) -> str:
    """A metric as the pages print it: up to `digits` significant digits, '—' for none, inf and nan spelled."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.{digits}g}"


def seconds(value: Any) -> str:
    """A duration: 42.1 s, 3 min 05 s, 2 h 01 min."""
    if not isinstance(value, (int, float)):
        return "—"
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{int(value // 60)} min {int(value % 60):02d} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60):02d} min"


_environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(UI_FOLDER / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
)
templates = Jinja2Templates(env=_environment)
templates.env.filters["number"] = number
templates.env.filters["seconds"] = seconds


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """`template` filled with `context` (values escaped), as an HTML response."""
    return templates.TemplateResponse(request, template, context, status_code=status_code)
