"""`halp serve --engine ray`: the same app on Ray Serve (the optional extras ray and serve).

Each of `--replicas N` Ray Serve replicas builds the app when it starts: its own copy of the model, its own engine
and batcher, its own metrics. Ray Serve's proxy takes the HTTP requests on --host/--port and routes each to a
replica; nothing about distribution is halp's own. Paths are made absolute: replicas on other nodes need the run
directory (and --images) on a filesystem every node sees.

`ray` is imported only here, and only when this engine runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from halp.errors import MissingDependencyError, install_hint
from halp.serve.app import GRACEFUL_SHUTDOWN_S, Service, create_app, new_api_key
from halp.serve.engine import Engine
from halp.serve.settings import ServeSettings
from halp.web import base_url, is_loopback

#: The Ray Serve application and deployment name.
APP_NAME = "halp"


def _import_serve() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise MissingDependencyError(
            f"--engine ray needs Ray Serve ({err}); install it with: {install_hint('ray,serve')}"
        ) from err
    return ray, serve


def replica_app(settings: ServeSettings, api_key: str | None, loopback: bool) -> Callable[[], Any]:
    """What a replica runs when it starts: load the engine, build the app (Ray Serve evaluates it there)."""

    def build() -> Any:
        return create_app(Service(Engine.load(settings), settings), api_key, loopback)

    return build


class HalpReplica:
    """A Ray Serve replica of `halp serve`; its ASGI app comes from `replica_app`."""


def deploy(
    settings: ServeSettings,
    replicas: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    gpus_per_replica: float | None = None,
    cpus_per_replica: float = 1.0,
) -> tuple[str, str | None]:
    """Start Ray Serve's proxy on host:port and `replicas` replicas; returns (base URL, API key) once they are up.

    Connects to the cluster in RAY_ADDRESS (or the one this process runs in), else starts a local one.
    """
    settings.validate()
    ray, serve = _import_serve()
    loopback = is_loopback(host)
    if api_key is None and not loopback:
        api_key = new_api_key()
    model = settings.model
    settings = replace(
        settings,
        run_dir=Path(settings.run_dir).resolve(),
        images=Path(settings.images).resolve() if settings.images is not None else None,
        model=str(Path(model).resolve()) if model and Path(model).exists() else model,
        name=settings.model_name,
    )
    if not ray.is_initialized():
        ray.init()
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    serve.start(http_options={"host": host, "port": port})
    deployment = serve.deployment(
        name=APP_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        # The replica's own queue bounds and batches; Ray must let that many requests reach it.
        max_ongoing_requests=settings.max_batch + settings.max_queue,
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
    )(serve.ingress(replica_app(settings, api_key, loopback))(HalpReplica))
    serve.run(deployment.bind(), name=APP_NAME, route_prefix="/")
    return f"{base_url(host, port)}/v1", api_key


def running_replicas() -> int:
    """Replicas of the halp deployment Ray Serve reports RUNNING."""
    _, serve = _import_serve()
    application = serve.status().applications.get(APP_NAME)
    if application is None:
        return 0
    deployment = application.deployments.get(APP_NAME)
    return int(deployment.replica_states.get("RUNNING", 0)) if deployment is not None else 0


def shutdown() -> None:
    """Stop the application; each replica finishes its requests in flight first (graceful_shutdown_timeout_s)."""
    _, serve = _import_serve()
    serve.delete(APP_NAME)
    serve.shutdown()


def run_until_interrupted() -> None:
    """Serve until Ctrl-C, then shut the application down gracefully."""
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        shutdown()
