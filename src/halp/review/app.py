"""The review web app (Starlette) and its server (uvicorn): `halp review RUN`.

Safety: the server binds 127.0.0.1 unless told otherwise and then requires a random token (in the
printed URL; the page keeps it in an HttpOnly cookie). On loopback it answers only requests addressed
to a loopback host name (no DNS rebinding). A POST must be JSON from the page's own origin (no
cross-site form can record a decision). Images are served by row number, never by a path from the
request, and only from inside the images directory (`halp.data.resolve_image_path`: no `..`, no symlink
out). The page inserts every user string with textContent, and a Content-Security-Policy forbids
inline scripts.
"""

from __future__ import annotations

import mimetypes
import secrets
import socket
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from halp import web
from halp.errors import ReviewError, ReviewServerError
from halp.review.decisions import VERDICTS
from halp.review.session import ORDERS, QUEUES, ReviewSession
from halp.web import LOOPBACK_NAMES, is_loopback

STATIC_DIR = Path(__file__).parent / "static"
TOKEN_COOKIE = "halp_review_token"
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# An image is shown by an <img>; opened on its own (an SVG with a script, say) it may do nothing.
IMAGE_POLICY = "default-src 'none'; style-src 'unsafe-inline'; sandbox"


def _require_web_stack() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ReviewServerError(
            f"halp review needs the web extra ({err.name} is missing): pip install 'halp[review]'"
        ) from err


def create_app(session: ReviewSession, token: str | None = None, loopback: bool = True) -> Any:
    """The Starlette app serving `session`; `token` (if any) is required on every request."""
    _require_web_stack()
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def reviewer_of(value: Any) -> str:
        return session.reviewer if value in (None, "") else str(value)

    def queue_of(params: Any) -> list[int]:
        return session.queue(
            params.get("queue") or "unknown", params.get("where") or None, params.get("order") or "table"
        )

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-store"})

    async def config(request: Request) -> Response:
        return JSONResponse(
            {
                "run": session.run_dir.name,
                "run_dir": str(session.run_dir),
                "rows": len(session.rows),
                "reviewer": session.reviewer,
                "queues": QUEUES,
                "orders": ORDERS,
                "verdicts": list(VERDICTS),
                "filters": session.filter_values(),
                "risk_sources": session.risk_sources,
                "reviews_file": str(session.log.path),
            }
        )

    async def queue(request: Request) -> Response:
        params = request.query_params
        reviewer = reviewer_of(params.get("reviewer"))
        indices = queue_of(params)
        return JSONResponse(
            {
                "indices": indices,
                "reviewed": session.reviewed(indices, reviewer),
                "progress": session.progress(indices, reviewer),
            }
        )

    async def item(request: Request) -> Response:
        reviewer = reviewer_of(request.query_params.get("reviewer"))
        return JSONResponse(session.item(int(request.path_params["index"]), reviewer))

    async def body(request: Request) -> dict[str, Any]:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ReviewError("decisions are posted as application/json")
        try:
            data = await request.json()
        except ValueError as err:
            raise ReviewError(f"the request body is not JSON: {err}") from err
        if not isinstance(data, dict):
            raise ReviewError("the request body is not a JSON object")
        return data

    async def decide(request: Request) -> Response:
        data = await body(request)
        reviewer = reviewer_of(data.get("reviewer"))
        if not isinstance(data.get("index"), int):
            raise ReviewError("decide needs the row's index")
        decision = session.decide(data["index"], data.get("label"), reviewer)
        return JSONResponse({"decision": asdict(decision), "progress": session.progress(queue_of(data), reviewer)})

    async def undo(request: Request) -> Response:
        data = await body(request)
        reviewer = reviewer_of(data.get("reviewer"))
        decision = session.undo(str(data.get("decision_id", "")), reviewer)
        index = session.index_of.get(decision.question_id)
        return JSONResponse(
            {"decision": asdict(decision), "index": index, "progress": session.progress(queue_of(data), reviewer)}
        )

    async def image(request: Request) -> Response:
        path, status, shown = session.image(int(request.path_params["index"]))
        if path is None:
            return error(f"image {status}: {shown}", 404)
        media_type, _ = mimetypes.guess_type(path.name)
        if media_type is None or not media_type.startswith("image/"):
            return error(f"{path.name} is not served: not an image type", 415)
        return FileResponse(path, media_type=media_type, headers={"Content-Security-Policy": IMAGE_POLICY})

    async def review_error(request: Request, exc: Exception) -> Response:
        message = str(exc)
        return error(message, 409 if "changed since" in message else 400)

    class Guard(BaseHTTPMiddleware):
        """Loopback host names (on loopback), the token (when set), same-origin POSTs, and security headers."""

        async def dispatch(self, request: Request, call_next: Callable) -> Response:
            if loopback and (request.url.hostname or "").lower() not in LOOPBACK_NAMES:
                # A page of another site that made its name resolve to 127.0.0.1 (DNS rebinding) gets nothing.
                return PlainTextResponse("Invalid host header", 400)
            set_cookie = False
            if token is not None:
                offered = request.query_params.get("token")
                header = request.headers.get("authorization", "")
                ok = any(
                    value is not None and secrets.compare_digest(value.encode(), token.encode())  # bytes: any text
                    for value in (offered, request.cookies.get(TOKEN_COOKIE), header.removeprefix("token ") or None)
                )
                if not ok:
                    return PlainTextResponse(
                        "This halp review server needs its token: open the URL it printed (…/?token=…).", 403
                    )
                set_cookie = offered is not None
            if request.method == "POST":
                origin = request.headers.get("origin")
                expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
                if origin is not None and origin != expected:
                    return PlainTextResponse(f"cross-origin request from {origin} refused", 403)
            response = await call_next(request)
            response.headers.setdefault("Content-Security-Policy", PAGE_POLICY)
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "no-referrer"
            response.headers["X-Frame-Options"] = "DENY"
            if set_cookie:
                response.set_cookie(TOKEN_COOKIE, token or "", httponly=True, samesite="strict")
            return response

    middleware = [Middleware(Guard)]
    routes = [
        Route("/", index),
        Route("/api/config", config),
        Route("/api/queue", queue),
        Route("/api/item/{index:int}", item),
        Route("/api/decide", decide, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
        Route("/image/{index:int}", image),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    return Starlette(routes=routes, middleware=middleware, exception_handlers={ReviewError: review_error})


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; a clear one-line error when the port is taken or the host is not ours."""
    return web.bind(host, port, ReviewServerError)


def review_url(host: str, port: int, token: str | None) -> str:
    return f"{web.base_url(host, port)}/" + (f"?token={token}" if token else "")


def serve(
    session: ReviewSession, host: str = "127.0.0.1", port: int = 8765, on_ready: Callable[[str], None] | None = None
) -> None:
    """Serve the review page until interrupted; `on_ready` gets the URL once the port is bound."""
    _require_web_stack()
    import uvicorn

    loopback = is_loopback(host)
    token = None if loopback else secrets.token_urlsafe(24)
    app = create_app(session, token, loopback)
    sock = bind(host, port)
    url = review_url(host, sock.getsockname()[1], token)
    if on_ready is not None:
        on_ready(url)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
