"""`llamatailor ui`: the FastAPI app that serves the dashboard's pages, its JSON routes and its static files."""

import socket

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from llamatailor.errors import ConfigError
from llamatailor.ui import routes_chat, routes_eval, routes_jobs, routes_reports, routes_runs
from llamatailor.ui.pages import STATIC
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

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for router in ROUTERS:
        app.include_router(router)
    return app


def check_port_free(host: str, port: int) -> None:
    """Raise ConfigError when `host`:`port` cannot be bound (another server has it), before the address is
    printed: otherwise the user would open the other server's page."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
