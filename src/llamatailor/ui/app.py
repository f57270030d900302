"""`llamatailor ui`: the FastAPI app that serves the dashboard's pages, its JSON routes and its static files."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from llamatailor.ui import routes_chat, routes_eval, routes_jobs, routes_reports, routes_runs
from llamatailor.ui.pages import STATIC, invalid_request
from llamatailor.ui.paths import OutsideRunsFolder
from llamatailor.ui.security import Handler, guard
from llamatailor.ui.settings import UiSettings

ROUTERS = (
    routes_runs.router,
    routes_eval.router,
    routes_reports.router,
    routes_chat.router,
    routes_jobs.router,
)


def create_app(settings: UiSettings) -> FastAPI:
    """The dashboard over `settings.runs`. Pages and routes read `request.app.state.settings`."""
    app = FastAPI(title="llamatailor ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings

    @app.middleware("http")
    async def _guard(request: Request, call_next: Handler) -> Response:
        return await guard(request, call_next, settings.api_key, settings.hosts)

    @app.exception_handler(OutsideRunsFolder)
    async def _outside(request: Request, exc: OutsideRunsFolder) -> PlainTextResponse:
        return PlainTextResponse(str(exc), status_code=404)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        # a page answers a 400 page naming the parameter, not FastAPI's 422 JSON; /api routes keep JSON
        return invalid_request(request, exc)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for router in ROUTERS:
        app.include_router(router)
    return app
