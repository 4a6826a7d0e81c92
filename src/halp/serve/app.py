"""The service's HTTP face (Starlette) and its local server (uvicorn): routes, keys, limits, streaming.

Routes: POST /v1/chat/completions (OpenAI's, plus a `halp` object and an `X-Halp-Risk` header), GET /v1/models,
POST /v1/risk (scores without generating), GET /healthz, GET /metrics.

Safety (as `halp review`, halp.web): loopback unless told otherwise, and then only requests addressed to a
loopback host name (no DNS rebinding). An API key (`Authorization: Bearer KEY`, what OpenAI clients send) is
required off loopback, and on loopback too when one is given. POSTs must be application/json, which a page of
another site cannot send without a CORS preflight this server never grants. Bodies beyond the limit are refused
while they are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from halp import web
from halp.errors import ServeError, ServeRequestError, install_hint
from halp.serve.batcher import Batcher, retry_after_header
from halp.serve.engine import Engine, Job, Outcome
from halp.serve.inputs import load_request_image
from halp.serve.metrics import ServeMetrics
from halp.serve.protocol import (
    check_question,
    chunk_body,
    completion_body,
    completion_id,
    error_body,
    parse_chat,
    parse_json,
    parse_risk,
    sse,
    usage_chunk,
)
from halp.serve.settings import ServeSettings

log = logging.getLogger(__name__)

#: Paths answered without the API key: a load balancer's health check learns only that the service is up.
OPEN_PATHS = ("/healthz",)
#: Seconds uvicorn lets requests in flight finish after a shutdown signal before it closes their connections.
GRACEFUL_SHUTDOWN_S = 60


def require_serve_stack() -> None:
    for module in ("starlette", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ImportError as err:
            raise ServeError(
                f"halp serve needs the serve extra ({module} is missing); install it with: {install_hint('serve')}"
            ) from err


class Service:
    """One engine behind one batcher, with its metrics: what the routes call."""

    def __init__(self, engine: Engine, settings: ServeSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = ServeMetrics()
        self.batcher = Batcher(
            engine.run_batch, settings.max_batch, settings.max_wait_ms / 1000.0, settings.max_queue,
            on_batch=self.metrics.batch_done, on_depth=self.metrics.queue_depth.set,
        )  # fmt: skip
        self.started = time.time()

    def halp_object(self, outcome: Outcome) -> dict[str, Any]:
        info = self.engine.describe()
        return {
            "risk": outcome.risk,
            "threshold": info["threshold"],
            "decision": outcome.decision,
            "flagged": outcome.flagged,
            "policy": info["policy"],
            "feature": info["feature"],
            "probe": info["probe"],
            "run": info["run"],
            "decode_tokens_saved": outcome.decode_tokens_saved,
        }


def _risk_header(outcome: Outcome) -> dict[str, str]:
    return {"X-Halp-Risk": format(outcome.risk, ".6g")}


def _usage(outcome: Outcome) -> dict[str, int]:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}  # fmt: skip


def create_app(service: Service, api_key: str | None = None, loopback: bool = True) -> Any:
    """The Starlette app of `service`; its lifespan starts the batcher and, on shutdown, lets queued rows finish."""
    require_serve_stack()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    settings, engine, metrics = service.settings, service.engine, service.metrics
    limits = settings.limits
    model_name = settings.model_name

    def error_response(error: ServeRequestError) -> JSONResponse:
        return JSONResponse(error_body(error), status_code=error.status, headers=retry_after_header(error))

    async def read_body(request: Request) -> dict[str, Any]:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise ServeRequestError("requests are posted as application/json", 415, None, "unsupported_media_type")
        declared = request.headers.get("content-length")
        too_large = ServeRequestError(f"the request body is larger than this server takes ({limits.max_body_bytes} "
                                      "bytes)", 413, None, "body_too_large")  # fmt: skip
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limits.max_body_bytes:
                raise too_large
        return parse_json(bytes(body))

    def timed(endpoint: str, handler: Callable) -> Callable:
        async def route(request: Request) -> Response:
            start = time.perf_counter()
            try:
                response = await handler(request)
            except ServeRequestError as error:
                response = error_response(error)
            if not isinstance(response, StreamingResponse):  # a stream is counted when it ends
                metrics.request_done(endpoint, response.status_code, time.perf_counter() - start)
            return response

        return route

    async def chat(request: Request) -> Response:
        start = time.perf_counter()
        data = await read_body(request)
        asked = parse_chat(data, model_name, limits, engine.default_max_tokens)
        image = await run_in_threadpool(load_request_image, asked.image, settings.images, engine.exif_orientation,
                                        limits.max_image_pixels)  # fmt: skip
        engine.check_question(asked.question)
        ident = completion_id()
        if not asked.stream:
            job = Job(image, asked.question, asked.max_tokens)
            (future,) = service.batcher.submit([job])
            await future
            if job.error is not None:
                raise job.error
            assert job.outcome is not None
            body = completion_body(ident, model_name, job.outcome.answer, job.outcome.finish_reason or "stop",
                                   _usage(job.outcome), service.halp_object(job.outcome))  # fmt: skip
            return JSONResponse(body, headers=_risk_header(job.outcome))

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(image, asked.question, asked.max_tokens,
                  on_event=lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)))  # fmt: skip
        (future,) = service.batcher.submit([job])
        future.add_done_callback(lambda done: events.put_nowait(("done", None)))
        kind, _ = await events.get()  # the score comes before any token; a failure before it is a plain error
        if kind != "scored":
            raise job.error or ServeRequestError("the request failed before it was scored", 500, None, None,
                                                 "server_error")  # fmt: skip
        assert job.outcome is not None
        outcome = job.outcome

        async def stream() -> AsyncIterator[bytes]:
            status = 200
            try:
                yield sse(chunk_body(ident, model_name, {"role": "assistant", "content": ""},
                                     halp=service.halp_object(outcome)))  # fmt: skip
                while True:
                    kind, value = await events.get()
                    if kind == "text":
                        yield sse(chunk_body(ident, model_name, {"content": value}))
                    elif kind == "done":
                        break
                if job.error is not None:
                    status = job.error.status
                    yield sse(error_body(job.error))
                else:
                    yield sse(chunk_body(ident, model_name, {}, outcome.finish_reason or "stop"))
                    if asked.include_usage:
                        yield sse(usage_chunk(ident, model_name, _usage(outcome)))
                yield sse("[DONE]")
            finally:
                metrics.request_done("chat", status, time.perf_counter() - start)

        headers = {**_risk_header(outcome), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def risk(request: Request) -> Response:
        data = await read_body(request)
        items = parse_risk(data, model_name, limits)
        results: list[dict[str, Any]] = [{"index": index} for index in range(len(items))]
        jobs: list[tuple[int, Job]] = []
        for index, item in enumerate(items):
            param = f"items[{index}]"
            try:
                image = await run_in_threadpool(load_request_image, item.image, settings.images,
                                                engine.exif_orientation, limits.max_image_pixels, param)  # fmt: skip
                check_question(item.question, limits, param)
                engine.check_question(item.question, param)
            except ServeRequestError as error:
                results[index]["error"] = error_body(error)["error"]
                continue
            jobs.append((index, Job(image, item.question, 0)))
        if jobs:
            await asyncio.gather(*service.batcher.submit([job for _, job in jobs]))
        for index, job in jobs:
            if job.error is not None:
                results[index]["error"] = error_body(job.error)["error"]
            else:
                assert job.outcome is not None
                results[index].update(risk=job.outcome.risk, flagged=job.outcome.flagged)
        info = engine.describe()
        return JSONResponse({
            "object": "list", "model": model_name, "data": results,
            "halp": {key: info[key] for key in ("threshold", "feature", "probe", "run")},
        })  # fmt: skip

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(model_name, service.started)]})

    async def model(request: Request) -> Response:
        if request.path_params["name"] != model_name:
            raise ServeRequestError(f"the model {request.path_params['name']!r} does not exist here", 404, "model",
                                    "model_not_found")  # fmt: skip
        return JSONResponse(_model_card(model_name, service.started))

    async def healthz(request: Request) -> Response:
        closing = service.batcher.closing
        body = {"status": "shutting down" if closing else "ok", "model": model_name,
                "queue_depth": service.batcher.depth, "running": service.batcher.running}  # fmt: skip
        return JSONResponse(body, status_code=503 if closing else 200)

    async def prometheus(request: Request) -> Response:
        payload, media_type = metrics.exposition()
        return Response(payload, media_type=media_type)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("halp serve: unexpected error on %s", request.url.path, exc_info=exc)
        return error_response(ServeRequestError(f"internal error: {type(exc).__name__}", 500, None, "internal_error",
                                                "server_error"))  # fmt: skip

    class Guard(BaseHTTPMiddleware):
        """Loopback host names (on loopback), the API key (when set), JSON-only POSTs."""

        async def dispatch(self, request: Request, call_next: Callable) -> Response:
            if loopback and (request.url.hostname or "").lower() not in web.LOOPBACK_NAMES:
                # A page of another site that made its name resolve to 127.0.0.1 (DNS rebinding) gets nothing.
                return error_response(ServeRequestError("invalid Host header", 400, None, "invalid_host"))
            if api_key is not None and request.url.path not in OPEN_PATHS:
                offered = request.headers.get("authorization", "")
                scheme, _, value = offered.partition(" ")
                if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip().encode(), api_key.encode()):
                    return error_response(ServeRequestError(
                        "this server needs its API key: send Authorization: Bearer KEY (OpenAI clients: api_key=KEY)",
                        401, None, "invalid_api_key",
                    ))  # fmt: skip
            response = await call_next(request)
            response.headers["X-Content-Type-Options"] = "nosniff"
            return response

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await service.batcher.start()
        try:
            yield
        finally:
            await service.batcher.close()  # queued rows finish; new ones get 503

    routes = [
        Route("/v1/chat/completions", timed("chat", chat), methods=["POST"]),
        Route("/v1/risk", timed("risk", risk), methods=["POST"]),
        Route("/v1/models", timed("models", models)),
        Route("/v1/models/{name:path}", timed("models", model)),
        Route("/healthz", healthz),
        Route("/metrics", prometheus),
    ]
    return Starlette(
        routes=routes, middleware=[Middleware(Guard)], lifespan=lifespan, exception_handlers={Exception: unexpected}
    )


def _model_card(name: str, created: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "halp"}


def new_api_key() -> str:
    return "halp-" + secrets.token_urlsafe(32)


def serve(
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    on_ready: Callable[[str, Engine, str | None], None] | None = None,
) -> None:
    """Load the engine, bind, serve until SIGINT/SIGTERM; requests in flight and queued rows finish first.

    Off loopback without `api_key`, a key is generated; `on_ready(url, engine, key)` gets it with the URL.
    """
    require_serve_stack()
    import uvicorn

    loopback = web.is_loopback(host)
    if api_key is None and not loopback:
        api_key = new_api_key()
    sock = web.bind(host, port, ServeError)  # a taken port fails before the model loads
    try:
        engine = Engine.load(settings)
        app = create_app(Service(engine, settings), api_key, loopback)
        url = f"{web.base_url(host, sock.getsockname()[1])}/v1"
        if on_ready is not None:
            on_ready(url, engine, api_key)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)  # fmt: skip
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
