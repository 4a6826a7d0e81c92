"""`halp serve`: an OpenAI-compatible endpoint for a run's model that scores every request from its prefill."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from halp.cli.app import DeviceOption, TrustRemoteCodeOption, app, err_console, fail, setup_logging

if TYPE_CHECKING:
    from halp.serve.engine import Engine

ENGINES = ("local", "ray")


@app.command()
def serve(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with trained probes (halp probe).")],
    feature: Annotated[str | None, typer.Option(help="Feature to score with (default: best AUROC).")] = None,
    probe: Annotated[str | None, typer.Option(help="logreg or mlp (default: best AUROC).")] = None,
    threshold: Annotated[float | None, typer.Option(help="Flag (or abstain) at risk >= T (default: the probe's).")] = (
        None
    ),
    target_coverage: Annotated[
        float | None,
        typer.Option(
            help="Choose the threshold answering this fraction of requests, from the run's out-of-fold "
            "risk-coverage curve; prints the expected error rate among the answered."
        ),
    ] = None,
    policy: Annotated[
        str,
        typer.Option(
            help="annotate (answer, report the risk) or abstain (refuse without decoding at or above the threshold)."
        ),
    ] = "annotate",
    refusal: Annotated[str | None, typer.Option(help="The answer of an abstained request.")] = None,
    images: Annotated[
        Path | None, typer.Option(help="Directory plain image file names of requests are read from (confined to it).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback requires an API key.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port (0: any free one).")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="HALP_API_KEY",
            help="Key clients send as Authorization: Bearer KEY (generated and printed off loopback when not given).",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Model name clients pass (default: the run directory's name).")] = (
        None
    ),
    max_batch: Annotated[int, typer.Option(min=1, help="Rows per prefill pass.")] = 8,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long a batch waits for more requests.")] = 5.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Rows waiting for a batch; beyond it: 503 + Retry-After.")] = (
        64
    ),
    max_tokens: Annotated[
        int | None, typer.Option(min=1, help="max_tokens of a request that gives none (default: the run's).")
    ] = None,
    max_tokens_limit: Annotated[int, typer.Option(min=1, help="The largest max_tokens a request may ask for.")] = 512,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body, in MiB.")] = 20.0,
    max_image_pixels: Annotated[int, typer.Option(min=1, help="Largest image (width x height).")] = 4096 * 4096,
    engine: Annotated[str, typer.Option(help="local (one process) or ray (Ray Serve replicas).")] = "local",
    replicas: Annotated[int, typer.Option(min=1, help="With --engine ray: model copies, each with its batching.")] = 1,
    gpus_per_replica: Annotated[
        float | None, typer.Option(help="With --engine ray: GPUs per replica (default: 1 if the cluster has GPUs).")
    ] = None,
    device: DeviceOption = "auto",
    dtype: Annotated[str, typer.Option(help="auto = the run's dtype, which the probe was trained on.")] = "auto",
    model: Annotated[str | None, typer.Option(help="The run's checkpoint, if it moved since extraction.")] = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Serve the run's model as an OpenAI-compatible API; every answer carries the risk its prefill predicts."""
    from halp.serve.settings import DEFAULT_REFUSAL, Limits, ServeSettings

    setup_logging()
    if engine not in ENGINES:
        fail(f"--engine {engine!r}: choose local or ray")
    if replicas > 1 and engine != "ray":
        fail("--replicas needs --engine ray (one process serves one model copy)")
    settings = ServeSettings(
        run_dir=run_dir, feature=feature, probe=probe, threshold=threshold, target_coverage=target_coverage,
        policy=policy, refusal=refusal or DEFAULT_REFUSAL, images=images, device=device, dtype=dtype, model=model,
        trust_remote_code=trust_remote_code, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
        name=name,
        limits=Limits(max_tokens=max_tokens_limit, default_max_tokens=max_tokens,
                      max_body_bytes=int(max_body_mb * 1024 * 1024), max_image_pixels=max_image_pixels),
    )  # fmt: skip
    settings.validate()
    if engine == "ray":
        from halp.serve.ray_serve import deploy, run_until_interrupted

        url, key = deploy(settings, replicas, host, port, api_key, gpus_per_replica)
        _say(f"halp serve: {replicas} Ray Serve replica(s) of {settings.model_name} at {url}; Ctrl-C stops")
        if key is not None and key != api_key:
            _say(f"API key (send Authorization: Bearer KEY): {key}")
        run_until_interrupted()
        _say("halp serve: stopped")
        return

    from halp.serve.app import serve as serve_locally

    def ready(url: str, loaded: Engine, key: str | None) -> None:
        _announce(loaded, settings.model_name, run_dir, url)
        if key is not None and key != api_key:
            _say(f"API key (generated; send Authorization: Bearer KEY, OpenAI clients: api_key=KEY): {key}")
        typer.echo(url)

    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C once the requests in flight finished
        serve_locally(settings, host, port, api_key, on_ready=ready)
    _say("halp serve: stopped")


def _say(text: str) -> None:
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


def _announce(engine: Engine, model_name: str, run_dir: Path, url: str) -> None:
    info = engine.describe()
    choice = engine.choice
    _say(
        f"halp serve: model {model_name!r} from {run_dir} ({info['adapter']} on {info['device']}, "
        f"{info['dtype']}); risk from {info['feature']} ({info['probe']}); threshold {info['threshold']:.4g} "
        f"({choice.source}); policy {info['policy']}; default max_tokens {info['default_max_tokens']}"
    )
    if choice.coverage is not None and choice.expected_error is not None:
        _say(
            f"at this threshold the run's out-of-fold scores ({choice.rows} rows) answer {choice.coverage:.1%} of "
            f"requests with an expected error rate of {choice.expected_error:.1%} among the answered"
        )
    _say(f"listening on {url} (OpenAI base_url); Ctrl-C stops after the requests in flight")
