"""Who may use the UI: an API key beyond loopback, requests only for the host the UI was opened at, writes
only from its own pages, and a content security policy that runs no script but the package's own files.

The key reaches the browser once, in the URL `llamatailor ui` prints (`?key=...`); the UI answers with an
HttpOnly cookie and a redirect to the same page without it. Scripts and API clients may send
`Authorization: Bearer <key>` instead.
"""

import hmac
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from llamatailor.serve.backend import is_loopback

COOKIE = "llamatailor_ui_key"
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# No inline script, no remote origin: a value from user data that slipped past escaping still cannot run.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")  # the Host names answered without a key

Handler = Callable[[Request], Awaitable[Response]]


def key_matches(given: str | None, key: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


def request_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.cookies.get(COOKIE)


def host_allowed(request: Request, allowed_hosts: tuple[str, ...]) -> bool:
    """Whether the Host header names this UI: a name in `allowed_hosts` ("*": any), or any loopback host
    (`is_loopback`) when a loopback name is allowed. Refuses DNS rebinding: a page on another name that
    resolves to 127.0.0.1 sends its own name."""
    host = urlsplit(f"//{request.headers.get('host', '')}").hostname or ""
    if "*" in allowed_hosts or host in allowed_hosts or f"[{host}]" in allowed_hosts:
        return True
    return is_loopback(host) and any(is_loopback(allowed) for allowed in allowed_hosts)


def same_origin(request: Request) -> bool:
    """A write comes from the UI's own pages: Origin (sent by browsers on POST) names this host, or is
    absent (a script with the key)."""
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


async def guard(request: Request, call_next: Handler, key: str | None, hosts: tuple[str, ...]) -> Response:
    """The UI's middleware: host check, key check (with the ?key= cookie hand-off), origin check on writes,
    and security headers on every answer."""
    if not host_allowed(request, hosts):
        return PlainTextResponse("this UI answers only to the host it was started for", status_code=421)
    if key is not None:
        offered = request.query_params.get("key")
        if offered is not None and key_matches(offered, key) and request.method == "GET":
            response: Response = RedirectResponse(request.url.remove_query_params("key"), status_code=303)
            response.set_cookie(COOKIE, offered, httponly=True, samesite="strict")
            return _headers(response)
        if not key_matches(request_key(request), key):
            message = "missing or wrong key: open the address `llamatailor ui` printed (it carries ?key=...)"
            return _headers(PlainTextResponse(message, status_code=401))
    if request.method in UNSAFE_METHODS and not same_origin(request):
        return _headers(PlainTextResponse("cross-site request refused", status_code=403))
    return _headers(await call_next(request))


def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
