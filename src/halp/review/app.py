"""The review web app (Starlette) and its server (uvicorn): `halp review RUN`.

Safety: the server binds 127.0.0.1 unless told otherwise and requires a random token there too (research
GPU machines are shared: any local user could otherwise read the run and record decisions), as Jupyter
does: it is in the printed URL, and the page keeps it in an HttpOnly cookie named after the port (`--no-token`
serves without one, with a warning). On loopback it answers only requests addressed to a loopback host name
(no DNS rebinding). A POST must be JSON from the page's own origin (no cross-site form can record a decision),
of at most MAX_BODY_BYTES and MAX_JSON_DEPTH levels, and every field is checked before anything is recorded:
a refused request writes nothing. Images are served by row number, never by a path from the request, only
from inside the images directory (`halp.data.resolve_image_path`: no `..`, no symlink out) and only regular
files (`halp.userfiles`). The page inserts every user string with textContent, and a Content-Security-Policy
forbids inline scripts.
"""

from __future__ import annotations

import json
import mimetypes
import secrets
import socket
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from halp import web
from halp.errors import ImageError, ReviewError, ReviewServerError, install_hint
from halp.review.model import ORDERS, QUEUES, VERDICTS, check_reviewer
from halp.review.session import ReviewSession
from halp.userfiles import READ_LIMIT, read_user_file
from halp.web import LOOPBACK_NAMES, is_loopback

STATIC_DIR = Path(__file__).parent / "static"
TOKEN_COOKIE = "halp_review_token"
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# An image is shown by an <img>; opened on its own (an SVG with a script, say) it may do nothing.
IMAGE_POLICY = "default-src 'none'; style-src 'unsafe-inline'; sandbox"
#: A decision or undo is a few hundred bytes of JSON; anything larger or deeper is refused unread.
MAX_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 8
#: The request fields the server reads, each a string (or absent/null); `index` is an integer.
TEXT_FIELDS = ("queue", "where", "order", "reviewer", "label", "decision_id")


def json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether a JSON text nests arrays/objects deeper than `limit` (checked before parsing: the parser recurses)."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def check_fields(data: dict[str, Any], index: bool = False) -> None:
    """Refuse a request body whose fields have the wrong JSON type (a queue given as a list, say)."""
    for name in TEXT_FIELDS:
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            raise ReviewError(f"{name} must be a string, not a JSON {type(value).__name__}")
    if index and (not isinstance(data.get("index"), int) or isinstance(data.get("index"), bool)):
        raise ReviewError("decide needs the row's index (an integer)")


def token_cookie(port: int | None) -> str:
    """The token's cookie, one per port: cookies are not kept apart by port, and two review servers on one host
    must not overwrite each other's (Jupyter names its cookies by port too)."""
    return f"{TOKEN_COOKIE}_{port or 80}"


class _BodyTooLarge(ReviewError):
    """A request body over MAX_BODY_BYTES (HTTP 413)."""


def _require_web_stack() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ReviewServerError(
            f"halp review needs the review extra ({err.name} is missing): {install_hint('review')}"
        ) from err


def create_app(session: ReviewSession, token: str | None = None, loopback: bool = True) -> Any:
    """The Starlette app serving `session`; `token` (if any) is required on every request."""
    _require_web_stack()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
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
                "labels_file": session.labels_source,
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
        """The request's JSON object, refused unread when it is larger than MAX_BODY_BYTES, and unparsed when it
        nests deeper than MAX_JSON_DEPTH."""
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ReviewError("decisions are posted as application/json")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise _BodyTooLarge(f"the request body is larger than {MAX_BODY_BYTES} bytes")
        raw = bytearray()
        async for chunk in request.stream():  # also a body sent without a length (chunked)
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise _BodyTooLarge(f"the request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
            if json_depth_exceeds(text, MAX_JSON_DEPTH):
                raise ReviewError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
            data = json.loads(text)
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            if isinstance(err, ReviewError):
                raise
            raise ReviewError(f"the request body is not JSON: {err}") from err
        if not isinstance(data, dict):
            raise ReviewError("the request body is not a JSON object")
        return data

    async def decide(request: Request) -> Response:
        # Every field is checked (types, row, label, reviewer, queue and filter) before the decision is recorded.
        data = await body(request)
        check_fields(data, index=True)
        reviewer = check_reviewer(reviewer_of(data.get("reviewer")))
        indices = queue_of(data)
        session.row(data["index"])
        if data.get("label") is not None and data["label"] not in VERDICTS:
            raise ReviewError(f"label {data['label']!r} is not one of {', '.join(VERDICTS)}")
        decision = session.decide(data["index"], data.get("label"), reviewer)
        return JSONResponse({"decision": asdict(decision), "progress": session.progress(indices, reviewer)})

    async def undo(request: Request) -> Response:
        data = await body(request)
        check_fields(data)
        reviewer = check_reviewer(reviewer_of(data.get("reviewer")))
        indices = queue_of(data)
        decision = session.undo(data.get("decision_id") or "", reviewer)
        index = session.index_of.get(decision.question_id)
        progress = session.progress(indices, reviewer)
        return JSONResponse({"decision": asdict(decision), "index": index, "progress": progress})

    async def image(request: Request) -> Response:
        path, status, shown = session.image(int(request.path_params["index"]))
        if path is None:
            return error(f"image {status}: {shown}", 404)
        media_type, _ = mimetypes.guess_type(path.name)
        if media_type is None or not media_type.startswith("image/"):
            return error(f"{path.name} is not served: not an image type", 415)
        try:  # a regular file only, read from the descriptor that was checked (never a FIFO that blocks)
            data = await run_in_threadpool(read_user_file, path, "image file", READ_LIMIT, ImageError)
        except ImageError as err:
            return error(str(err), 404)
        headers = {"Content-Security-Policy": IMAGE_POLICY, "Cache-Control": "no-store"}
        return Response(data, media_type=media_type, headers=headers)

    async def review_error(request: Request, exc: Exception) -> Response:
        message = str(exc)
        if isinstance(exc, _BodyTooLarge):
            return error(message, 413)
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
                cookie = request.cookies.get(token_cookie(request.url.port))
                ok = any(
                    value is not None and secrets.compare_digest(value.encode(), token.encode())  # bytes: any text
                    for value in (offered, cookie, header.removeprefix("token ") or None)
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
                response.set_cookie(token_cookie(request.url.port), token or "", httponly=True, samesite="strict")
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
    session: ReviewSession,
    host: str = "127.0.0.1",
    port: int = 8765,
    on_ready: Callable[[str], None] | None = None,
    token: bool = True,
) -> None:
    """Serve the review page until interrupted; `on_ready` gets the URL once the port is bound. `token=False`
    (`--no-token`, loopback only) serves without a token: any local user or process can then read and decide."""
    _require_web_stack()
    import uvicorn

    loopback = is_loopback(host)
    if not token and not loopback:
        raise ReviewServerError(f"--no-token is for loopback only: on {host} every reviewer needs the token")
    secret = secrets.token_urlsafe(24) if token else None
    app = create_app(session, secret, loopback)
    sock = bind(host, port)
    url = review_url(host, sock.getsockname()[1], secret)
    if on_ready is not None:
        on_ready(url)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
