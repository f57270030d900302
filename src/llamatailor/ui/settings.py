"""What `llamatailor ui` was started with, and how a route finds it from its request."""

from dataclasses import dataclass, field

from starlette.requests import Request

from llamatailor.ui.paths import RunsFolder
from llamatailor.ui.security import LOOPBACK_NAMES


@dataclass
class UiSettings:
    """`api_key` None: no key asked (loopback only; the CLI checks). `hosts`: the Host header names accepted
    ("*": any). `services`: per-app objects the routes keep between requests (loaded chat models, jobs)."""

    runs: RunsFolder
    api_key: str | None = None
    hosts: tuple[str, ...] = LOOPBACK_NAMES
    services: dict[str, object] = field(default_factory=dict)


def settings_of(request: Request) -> UiSettings:
    settings: UiSettings = request.app.state.settings
    return settings


def runs_of(request: Request) -> RunsFolder:
    return settings_of(request).runs
