"""The UI's HTML: Jinja2 templates shipped in the package, autoescaped (every value from a run's files is text,
never markup), and the number formats the pages share."""

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.templating import Jinja2Templates
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

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


# What a parameter takes, in words, per pydantic error type; the bounds' types read their limit from the
# error's context.
EXPECTED = {"bool_parsing": "true or false", "int_parsing": "a whole number", "float_parsing": "a number"}
BOUNDS = {"greater_than_equal": ("≥", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("≤", "le"),
          "less_than": ("<", "lt")}  # fmt: skip


def parameter_problem(error: Mapping[str, Any], query: Mapping[str, str]) -> str:
    """One request validation error as "PARAM: expected WHAT, got VALUE", a query's value as the address
    wrote it (pydantic's own message for an error type without words here)."""
    location = [str(part) for part in error.get("loc", ()) if part not in ("query", "body", "path")]
    name = ".".join(location) or "request body"
    kind, context = error.get("type", ""), error.get("ctx") or {}
    if kind == "json_invalid":
        return f"request body: not valid JSON ({context.get('error', '')})"
    if kind == "literal_error":
        expected = f"one of {context.get('expected')}"
    elif kind in BOUNDS:
        sign, key = BOUNDS[kind]
        expected = f"a number {sign} {context.get(key)}"
    elif kind in EXPECTED:
        expected = EXPECTED[kind]
    elif kind == "missing":
        return f"{name}: expected a value, got none"
    else:
        return f"{name}: {error.get('msg', 'not valid')}"
    from_query = error.get("loc", ("",))[0] == "query" and name in query
    got = query[name] if from_query else error.get("input")
    return f"{name}: expected {expected}, got {got!r}"


def invalid_request(request: Request, exc: RequestValidationError) -> Response:
    """The answer to a request whose parameters do not validate: for a page, a 400 page naming each bad
    parameter and what it takes; for a JSON route (/api/...), 422 with those words as `detail`."""
    problems = [parameter_problem(error, request.query_params) for error in exc.errors()]
    if request.url.path.startswith("/api/"):
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)
    return render(request, "bad_request.html", status_code=400, problems=problems, path=request.url.path)
