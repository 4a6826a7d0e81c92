"""`halp serve`: risk and answer from one prefill, the policies, batching, limits, operations, and OpenAI clients.

The served run is a small `halp world` run (halp.testing.serving): the world model halp ships, 32 questions of a
new study set, exact labels of its own answers, logistic probes. The references are independent entry points on
the same rows: `halp predict` (its own prefill-only passes, another batch size) for the risk and the answers
`halp extract` stored for the answer.

Tolerances: a risk is the probe on float32 features of the same rows computed in another batch; features agree to
1e-4 relative across batch compositions (README), which moves a logistic probability by far less than 1e-4 here,
so risks are compared with abs=1e-4. Answers are greedy strings and must be equal.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import halp
from halp.cli import app as cli
from halp.data import load_image, read_samples
from halp.errors import ServeRequestError, install_hint
from halp.predict import RiskScorer
from halp.serve.engine import Engine, Job, decode_rows, prefill_and_decode, run_prefill
from halp.serve.policy import Policy, threshold_for_coverage
from halp.serve.protocol import parse_chat
from halp.serve.settings import DEFAULT_REFUSAL, Limits, ServeSettings
from halp.testing import available_fixtures
from halp.testing.serving import SERVED_FEATURES
from halp.world.study import read_answers

pytest.importorskip("starlette", reason=f"halp serve needs the serve extra: {install_hint('serve')}")
pytest.importorskip("prometheus_client", reason=f"halp serve needs the serve extra: {install_hint('serve')}")

from starlette.testclient import TestClient

from halp.serve.app import Service, create_app
from halp.serve.batcher import Batcher

RISK_ABS = 1e-4
FEATURE = SERVED_FEATURES[0]  # query_token/layer_2
ANSWER_TOKENS = 4  # the run's answer length: what `halp extract` decoded
LOOPBACK = "http://127.0.0.1"
#: A wait no test reaches: batches form by count, never by the clock.
FOREVER_MS = 600_000.0


# ----- the served run and its references -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(served_world):
    return served_world


@pytest.fixture(scope="module")
def predicted(world, tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """question_id -> risk, by `halp predict` (prefill-only passes of 5 rows) with the served probe."""
    out = tmp_path_factory.mktemp("predict") / "risk.csv"
    result = CliRunner().invoke(cli, [
        "predict", "--run", str(world.run_dir), "--data", str(world.table), "--images", str(world.images),
        "--feature", FEATURE, "--probe", "logreg", "--batch-size", "5", "--device", "cpu", "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out, dtype={"question_id": str})
    return dict(zip(frame["question_id"], frame["risk"].astype(float), strict=True))


@pytest.fixture(scope="module")
def answers(world) -> dict[str, str]:
    """question_id -> the greedy answer `halp extract` stored."""
    rows = read_answers(world.run_dir)
    return dict(zip(rows["question_id"], rows["answer"], strict=True))


@pytest.fixture(scope="module")
def samples(world):
    return read_samples(world.table)


@pytest.fixture(scope="module")
def scorer(world) -> RiskScorer:
    return RiskScorer.from_run(world.run_dir, FEATURE, "logreg", device="cpu")


@pytest.fixture(scope="module")
def median_risk(samples, predicted) -> float:
    """A threshold splitting the first 8 rows: those above it are flagged (or abstain), the others answered."""
    return float(np.median([predicted[sample.question_id] for sample in samples[:8]]))


def make_engine(scorer: RiskScorer, world, mode: str = "annotate", threshold: float = 0.5) -> Engine:
    return Engine(scorer, Policy(mode, threshold, DEFAULT_REFUSAL), ANSWER_TOKENS, world.run_dir)


def make_service(engine: Engine, world, **overrides) -> Service:
    settings = ServeSettings(world.run_dir, images=world.images, **overrides)
    return Service(engine, settings)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def chat_body(image: str, question: str, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}]
    return {"model": "run", "messages": [{"role": "user", "content": content}], **extra}


@contextlib.contextmanager
def running_server(app):
    """A real uvicorn server on a free loopback port, in a thread; yields (base URL, server)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    """Poll a condition of the server's state (not a timing assumption: it fails only if it never holds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def gate_engine(service: Service) -> tuple[threading.Event, threading.Event]:
    """Hold every batch at the engine's door until `release` is set; `entered` is set when one arrives."""
    release, entered = threading.Event(), threading.Event()
    run_batch = service.batcher.run_batch

    def gated(jobs):
        entered.set()
        assert release.wait(120), "the test never released the engine"
        return run_batch(jobs)

    service.batcher.run_batch = gated
    return release, entered


# ----- one prefill per request: equal to halp predict and halp extract --------------------------------------------


def test_a_batch_mixing_abstained_and_answered_rows_equals_predict_and_extract(
    world, scorer, samples, predicted, answers, median_risk
):
    engine = make_engine(scorer, world, "abstain", median_risk)
    rows = samples[:8]
    jobs = [Job(load_image(world.images, s.image_id), s.question, ANSWER_TOKENS) for s in rows]
    forward_rows: list[int] = []
    hook = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: forward_rows.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True
    )
    try:
        stats = engine.run_batch(jobs)
    finally:
        hook.remove()
    assert [item.rows for item in stats] == [8], "one prefill pass for the whole batch"
    abstained = [(s, j) for s, j in zip(rows, jobs, strict=True) if j.outcome.decision == "abstained"]
    answered = [(s, j) for s, j in zip(rows, jobs, strict=True) if j.outcome.decision == "answered"]
    assert abstained and answered and len(abstained) + len(answered) == 8
    for sample, job in zip(rows, jobs, strict=True):
        assert job.error is None
        assert job.outcome.risk == pytest.approx(predicted[sample.question_id], abs=RISK_ABS)
        assert job.outcome.flagged == (job.outcome.risk >= median_risk)
    for sample, job in answered:
        assert job.outcome.answer == answers[sample.question_id]
        assert job.outcome.decode_tokens_saved == 0 and job.outcome.completion_tokens >= 1
    for _, job in abstained:
        assert job.outcome.answer == DEFAULT_REFUSAL and job.outcome.finish_reason == "stop"
        assert job.outcome.decode_tokens_saved == ANSWER_TOKENS and job.outcome.completion_tokens == 0
    # The decode really skipped the abstained rows: the prefill saw 8 rows, every later step only those answering.
    decoded = stats[0].decoded_rows
    assert 0 < decoded <= len(answered)
    assert forward_rows[0] == 8 and len(forward_rows) > 1
    assert set(forward_rows[1:]) == {decoded}, forward_rows


def test_annotate_answers_every_row_and_flags_at_the_threshold(world, scorer, samples, predicted, answers,
                                                                median_risk):  # fmt: skip
    engine = make_engine(scorer, world, "annotate", median_risk)
    rows = samples[8:14]
    # Rows of one batch ask for different answer lengths and one is a /v1/risk item (no decoding).
    lengths = [ANSWER_TOKENS, 1, ANSWER_TOKENS, 0, 2, ANSWER_TOKENS]
    jobs = [Job(load_image(world.images, s.image_id), s.question, n) for s, n in zip(rows, lengths, strict=True)]
    engine.run_batch(jobs)
    for sample, job, length in zip(rows, jobs, lengths, strict=True):
        outcome = job.outcome
        assert outcome.risk == pytest.approx(predicted[sample.question_id], abs=RISK_ABS)
        if length == 0:
            assert outcome.decision == "scored" and outcome.answer == "" and outcome.completion_tokens == 0
            continue
        assert outcome.decision == ("flagged" if outcome.risk >= median_risk else "answered")
        assert outcome.completion_tokens <= length
        if length == ANSWER_TOKENS:
            assert outcome.answer == answers[sample.question_id]
        else:  # greedy answers are prefixes of longer greedy answers
            assert answers[sample.question_id].startswith(outcome.answer)
            assert outcome.finish_reason == ("length" if outcome.completion_tokens == length else "stop")


@pytest.mark.slow
@pytest.mark.parametrize("family", available_fixtures())
def test_decoding_a_subset_of_rows_equals_plain_greedy_generate(family, checkpoint_dir, vqa_set):
    """For every family with a tiny fixture, the engine's prefill-and-decode gives plain greedy `generate`'s tokens:
    when rows 0 and 2 of 4 stop after the prefill (they leave the cache and the others go on from it; the generic
    adapter, not verified to drop rows, keeps them finished), and when none does (one call)."""
    from halp.capture import FeatureExtractor, parse_layers
    from halp.loading import load_model
    from halp.models import adapter_for

    model, processor = load_model(str(checkpoint_dir(family)), "cpu", "float32", trust_remote_code=True)
    adapter = adapter_for(model, processor)
    # Every dedicated adapter claims it (and is verified here); the generic one does not.
    assert adapter.resumes_row_subsets == (type(adapter).__name__ != "GenericAdapter"), type(adapter).__name__
    extractor = FeatureExtractor(adapter, parse_layers("halp", adapter.num_layers))
    table, images = vqa_set
    rows = read_samples(table)[:4]
    questions = [s.question if i != 1 else s.question + " Answer with several words, please." for i, s in
                 enumerate(rows)]  # fmt: skip  (rows of different lengths: left padding differs)
    inputs = adapter.encode([load_image(images, s.image_id) for s in rows], questions)
    steps, eos = 6, eos_of(model)
    with torch.inference_mode():
        plain = model.generate(**extractor.device_inputs(inputs), max_new_tokens=steps, **extractor.greedy_settings())
        plain = [until_eos(row, eos) for row in plain[:, inputs["input_ids"].shape[1] :].tolist()]
        for leaving in ({0, 2}, set()):
            decoded = prefill_and_decode(
                extractor, extractor.device_inputs(inputs), extractor.locate(inputs), [steps] * 4, eos,
                lambda features, first, leaving=leaving: leaving,
            )  # fmt: skip
            assert decoded.split == bool(leaving and adapter.resumes_row_subsets)
            assert set(decoded.features) == set(extractor.names)
            for row in range(4):
                expected = [] if row in leaving else plain[row]
                assert decoded.tokens[row] == expected, (family, leaving, row, decoded.tokens[row], plain[row])


def eos_of(model) -> frozenset[int]:
    eos = model.generation_config.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else (eos or []))


def until_eos(tokens: list[int], eos: frozenset[int]) -> list[int]:
    """The answer's tokens: up to and with the first end of turn (plain generate pads after it)."""
    ends = [index for index, token in enumerate(tokens) if token in eos]
    return tokens[: ends[0] + 1] if ends else tokens


def test_rows_stay_in_the_batch_where_a_family_is_not_verified(checkpoint_dir, vqa_set):
    """An adapter that does not resume row subsets keeps every row in the batch (stopped rows finished, padded): the
    same tokens for the others, the decode of the stopped rows not saved; decoding a subset alone is refused."""
    from halp.capture import FeatureExtractor
    from halp.errors import ServeError
    from halp.loading import load_model
    from halp.models import adapter_for

    model, processor = load_model(str(checkpoint_dir("qwen2_vl")), "cpu", "float32")
    adapter = adapter_for(model, processor)
    adapter.resumes_row_subsets = False
    extractor = FeatureExtractor(adapter, [0])
    table, images = vqa_set
    rows = read_samples(table)[:3]
    inputs = adapter.encode([load_image(images, s.image_id) for s in rows], [s.question for s in rows])
    eos = eos_of(model)
    forward_rows: list[int] = []
    with torch.inference_mode():
        plain = model.generate(**extractor.device_inputs(inputs), max_new_tokens=5, **extractor.greedy_settings())
        hook = model.register_forward_pre_hook(
            lambda module, args, kwargs: forward_rows.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True
        )
        decoded = prefill_and_decode(extractor, extractor.device_inputs(inputs), extractor.locate(inputs), [5, 5, 5],
                                     eos, lambda features, first: {0, 1})  # fmt: skip
        hook.remove()
        prefill, _ = run_prefill(extractor, extractor.device_inputs(inputs), extractor.locate(inputs), True)
        with pytest.raises(ServeError, match="not verified"):
            decode_rows(extractor, prefill, extractor.device_inputs(inputs), [2], [4], eos)
    assert not decoded.split and set(forward_rows) == {3}
    assert decoded.tokens[:2] == [[], []]
    assert decoded.tokens[2] == until_eos(plain[2, inputs["input_ids"].shape[1] :].tolist(), eos)


# ----- HTTP: batching, streaming, the risk endpoint -------------------------------------------------------------


def test_concurrent_requests_are_one_batch_and_each_answer_is_its_own(world, scorer, samples, predicted, answers,
                                                                       median_risk):  # fmt: skip
    import httpx

    service = make_service(make_engine(scorer, world, "annotate", median_risk), world, max_batch=4,
                           max_wait_ms=FOREVER_MS)  # fmt: skip
    rows = samples[16:20]
    with running_server(create_app(service)) as (url, _), ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(
            lambda s: httpx.post(f"{url}/v1/chat/completions", json=chat_body(s.image_id, s.question), timeout=120),
            rows,
        ))  # fmt: skip
    metrics = service.metrics
    # The batch formed when the 4th request arrived, not when a clock ran out.
    assert metrics.value("halp_serve_batch_size_count") == 1 and metrics.value("halp_serve_batch_size_sum") == 4
    for sample, reply in zip(rows, replies, strict=True):
        assert reply.status_code == 200, reply.text
        body = reply.json()
        risk = body["halp"]["risk"]
        assert risk == pytest.approx(predicted[sample.question_id], abs=RISK_ABS)
        assert float(reply.headers["x-halp-risk"]) == pytest.approx(risk, rel=1e-5)
        assert body["choices"][0]["message"]["content"] == answers[sample.question_id]
        assert body["halp"]["decision"] == ("flagged" if risk >= median_risk else "answered")
        assert body["halp"] | {"risk": None} == {
            "risk": None, "threshold": median_risk, "decision": body["halp"]["decision"],
            "flagged": risk >= median_risk, "policy": "annotate", "feature": FEATURE, "probe": "logreg",
            "run": "run", "decode_tokens_saved": 0,
        }  # fmt: skip
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_failing_request_fails_alone(world, scorer, samples, answers):
    """An image the processor refuses (aspect ratio 400) in a batch of three: a 400 for it, answers for the rest."""
    import httpx

    service = make_service(make_engine(scorer, world), world, max_batch=3, max_wait_ms=FOREVER_MS)
    buffer = io.BytesIO()
    Image.new("RGB", (1, 400), (200, 30, 30)).save(buffer, format="PNG")
    thin = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    good = samples[20:22]
    bodies = [chat_body(good[0].image_id, good[0].question), chat_body(thin, "What colour is the square?"),
              chat_body(good[1].image_id, good[1].question)]  # fmt: skip
    with running_server(create_app(service)) as (url, _), ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda b: httpx.post(f"{url}/v1/chat/completions", json=b, timeout=120), bodies))
    assert [reply.status_code for reply in replies] == [200, 400, 200]
    error = replies[1].json()["error"]
    assert error["code"] == "invalid_input" and "aspect ratio" in error["message"]
    assert replies[0].json()["choices"][0]["message"]["content"] == answers[good[0].question_id]
    assert replies[2].json()["choices"][0]["message"]["content"] == answers[good[1].question_id]
    assert service.metrics.value("halp_serve_rows_total", {"decision": "failed"}) == 1


def test_a_failure_while_decoding_keeps_what_the_prefill_finished(world, scorer, samples, predicted, answers,
                                                                  median_risk, monkeypatch):  # fmt: skip
    """Decoding fails once (out of memory, say) after the prefill: rows the prefill finished (abstained, risk-only)
    keep their outcome; the others are run again alone and answered."""
    import halp.serve.engine as engine_module

    real, calls = engine_module.decode_rows, []

    def fails_first(*args, **kwargs):
        calls.append(len(args[3]))
        if len(calls) == 1:
            raise RuntimeError("decoding failed once")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "decode_rows", fails_first)
    engine = make_engine(scorer, world, "abstain", median_risk)
    rows = sorted(samples[:8], key=lambda s: predicted[s.question_id])
    low, high, scored = rows[0], rows[-1], rows[1]
    jobs = [Job(load_image(world.images, s.image_id), s.question, n) for s, n in
            [(low, ANSWER_TOKENS), (high, ANSWER_TOKENS), (scored, 0)]]  # fmt: skip
    stats = engine.run_batch(jobs)
    assert [job.error for job in jobs] == [None, None, None]
    assert jobs[0].outcome.answer == answers[low.question_id] and jobs[0].outcome.decision == "answered"
    assert jobs[1].outcome.decision == "abstained" and jobs[2].outcome.decision == "scored"
    assert [item.rows for item in stats] == [1], "only the answered row ran again"
    assert calls == [1], "the failed split; alone, the row decoded in one call"


def _events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_streaming_sends_the_risk_first_then_the_same_answer(world, scorer, samples, predicted, answers,
                                                              median_risk):  # fmt: skip
    sample = samples[22]
    for mode in ("annotate", "abstain"):  # threshold 0: every risk is at or above it, so flagged or abstained
        service = make_service(make_engine(scorer, world, mode, 0.0), world)
        with TestClient(create_app(service), base_url=LOOPBACK) as client:
            body = chat_body(data_url(world.images / sample.image_id), sample.question, stream=True,
                             stream_options={"include_usage": True})  # fmt: skip
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                header_risk = float(response.headers["x-halp-risk"])
                events = _events(response)
        first, *middle, usage, done = events
        assert done == "[DONE]"
        assert first["halp"]["risk"] == pytest.approx(predicted[sample.question_id], abs=RISK_ABS)
        assert header_risk == pytest.approx(first["halp"]["risk"], rel=1e-5)
        assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # the risk comes before any token
        text = "".join(event["choices"][0]["delta"].get("content", "") for event in middle)
        assert middle[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] > 0
        if mode == "annotate":
            assert text == answers[sample.question_id] and first["halp"]["decision"] == "flagged"
            assert len(middle) >= 2
        else:
            assert text == DEFAULT_REFUSAL and first["halp"]["decision"] == "abstained"
            assert first["halp"]["decode_tokens_saved"] == ANSWER_TOKENS and usage["usage"]["completion_tokens"] == 0


def test_risk_endpoint_scores_items_without_generating_and_bad_items_fail_alone(world, scorer, samples, predicted):
    service = make_service(make_engine(scorer, world), world, max_batch=8)
    rows = samples[24:28]
    items = [{"image": s.image_id, "question": s.question} for s in rows]
    items.insert(1, {"image": "https://example.org/cat.png", "question": "What is it?"})
    items.insert(3, {"image": rows[0].image_id, "question": "Is there <|image_pad|> here?"})
    items.insert(4, {"image": "../../etc/passwd", "question": "What is it?"})
    with TestClient(create_app(service), base_url=LOOPBACK) as client:
        reply = client.post("/v1/risk", json={"items": items})
    assert reply.status_code == 200
    data = reply.json()["data"]
    assert [item["index"] for item in data] == list(range(len(items)))
    errors = {item["index"]: item["error"]["code"] for item in data if "error" in item}
    assert errors == {1: "image_url_not_supported", 3: "special_token_in_question", 4: "invalid_image"}
    scored = [item for item in data if "error" not in item]
    for sample, item in zip(rows, scored, strict=True):
        assert item["risk"] == pytest.approx(predicted[sample.question_id], abs=RISK_ABS)
        assert item["flagged"] == (item["risk"] >= 0.5)
    assert service.metrics.value("halp_serve_completion_tokens_total") == 0, "nothing was generated"
    assert reply.json()["halp"] == {"threshold": 0.5, "feature": FEATURE, "probe": "logreg", "run": "run"}


# ----- limits, keys, queue, shutdown, metrics ----------------------------------------------------------------------


def test_limits_and_refusals_are_openai_errors(world, scorer, samples):
    sample = samples[0]
    width, height = Image.open(world.images / sample.image_id).size
    pixels = width * height
    limits = Limits(max_tokens=8, max_body_bytes=200_000, max_image_pixels=pixels - 1, max_question_chars=100)
    service = make_service(make_engine(scorer, world), world, limits=limits)
    image = data_url(world.images / sample.image_id)
    with TestClient(create_app(service), base_url=LOOPBACK) as client:
        post = lambda body, **kw: client.post("/v1/chat/completions", json=body, **kw)  # noqa: E731
        cases = {
            "temperature": (post(chat_body(sample.image_id, "What?", temperature=0.7)), 400),
            "n": (post(chat_body(sample.image_id, "What?", n=2)), 400),
            "max_tokens": (post(chat_body(sample.image_id, "What?", max_tokens=9)), 400),
            "model": (post({**chat_body(sample.image_id, "What?"), "model": "gpt-4o"}), 404),
            "image_too_large": (post(chat_body(image, "What colour is the square?")), 400),
            "question_too_long": (post(chat_body(sample.image_id, "why " * 30)), 400),
            "body_too_large": (post(chat_body("data:image/png;base64," + "A" * 300_000, "What?")), 413),
        }
        raw = client.post("/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"})
    for name, (reply, status) in cases.items():
        assert reply.status_code == status, (name, reply.text)
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], name
    assert cases["temperature"][0].json()["error"]["param"] == "temperature"
    assert cases["model"][0].json()["error"]["code"] == "model_not_found"
    assert f"{pixels} pixels" in cases["image_too_large"][0].json()["error"]["message"]
    assert raw.status_code == 415


def test_the_api_key_and_the_host_guard(world, scorer):
    service = make_service(make_engine(scorer, world), world)
    with TestClient(create_app(service, api_key="sesame", loopback=True), base_url=LOOPBACK) as client:
        refused = client.get("/v1/models")
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer open"})
        allowed = client.get("/v1/models", headers={"Authorization": "Bearer sesame"})
        health = client.get("/healthz")
        metrics = client.get("/metrics")
        rebound = client.get("/healthz", headers={"host": "attacker.example"})
    assert refused.status_code == wrong.status_code == metrics.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert allowed.status_code == 200 and allowed.json()["data"][0]["id"] == "run"
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert rebound.status_code == 400
    service = make_service(make_engine(scorer, world), world)
    with TestClient(create_app(service, api_key="sesame", loopback=False), base_url="http://serving.example") as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200


def test_a_full_queue_answers_503_with_retry_after(world, scorer, samples):
    import httpx

    service = make_service(make_engine(scorer, world), world, max_batch=1, max_queue=1, max_wait_ms=0)
    release, entered = gate_engine(service)
    body = chat_body(samples[0].image_id, samples[0].question)
    with running_server(create_app(service)) as (url, _), ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=120)
        assert entered.wait(60)
        queued = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=120)
        wait_until(lambda: service.batcher.depth == 1, "the second request to be queued")
        refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        release.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"


def test_shutdown_finishes_the_request_in_flight(world, scorer, samples, answers):
    import httpx

    service = make_service(make_engine(scorer, world), world)
    release, entered = gate_engine(service)
    sample = samples[1]
    with running_server(create_app(service)) as (url, server), ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=chat_body(sample.image_id,
                                sample.question), timeout=120)  # fmt: skip
        assert entered.wait(60)
        server.should_exit = True
        port = int(url.rsplit(":", 1)[1])

        def listening() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
            return False

        wait_until(lambda: not listening(), "the server to stop accepting connections")
        release.set()
        reply = in_flight.result()
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == answers[sample.question_id]
    assert service.batcher.closing and service.batcher.depth == 0


def test_metrics_count_abstentions_and_saved_decode_tokens(world, scorer, samples):
    from prometheus_client.parser import text_string_to_metric_families

    service = make_service(make_engine(scorer, world, "abstain", 0.0), world)  # every request abstains
    with TestClient(create_app(service), base_url=LOOPBACK) as client:
        for sample in samples[:2]:
            reply = client.post("/v1/chat/completions", json=chat_body(sample.image_id, sample.question,
                                                                        max_tokens=3))  # fmt: skip
            assert reply.json()["halp"]["decode_tokens_saved"] == 3
        text = client.get("/metrics").text
    families = list(text_string_to_metric_families(text))
    samples_seen = [sample for family in families for sample in family.samples]

    def value(name: str, **labels: str) -> float:
        return next(s.value for s in samples_seen if s.name == name and labels.items() <= s.labels.items())

    assert value("halp_serve_abstentions_total") == 2
    assert value("halp_serve_decode_tokens_saved_total") == 6
    assert value("halp_serve_rows_total", decision="abstained") == 2
    assert value("halp_serve_requests_total", endpoint="chat", status="200") == 2
    assert value("halp_serve_risk_count") == 2 and value("halp_serve_batch_size_count") == 2
    assert value("halp_serve_completion_tokens_total") == 0
    names = {family.name for family in families}
    assert {"halp_serve_queue_depth", "halp_serve_prefill_seconds", "halp_serve_request_seconds"} <= names


# ----- the threshold, the protocol, the images ---------------------------------------------------------------------


def test_target_coverage_threshold_against_an_independent_count(world):
    predictions = pd.read_csv(world.run_dir / "probes" / "predictions.csv")
    rows = predictions[(predictions["feature"] == FEATURE) & (predictions["probe"] == "logreg")]
    scores, labels = rows["score"].to_numpy(), rows["label"].to_numpy()
    for target in (0.25, 0.5, 0.8):
        choice = threshold_for_coverage(world.run_dir, FEATURE, "logreg", target)
        kept = scores < choice.threshold
        assert choice.coverage == pytest.approx(kept.mean(), abs=1e-12) and choice.coverage <= target
        assert choice.expected_error == pytest.approx(labels[kept].mean(), abs=1e-12)
        # The largest such coverage: keeping the next risk too would pass the target.
        assert (scores <= choice.threshold).mean() > target
        assert choice.rows == len(rows)


def test_coverage_thresholds_keep_whole_ties():
    from halp.report import risk_coverage

    risk = np.array([0.1, 0.1, 0.2, 0.3, 0.3, 0.3, 0.9])
    labels = np.array([0, 1, 0, 0, 1, 1, 1])
    curve = risk_coverage(labels, risk)
    # Tie groups end at coverages 2/7, 3/7, 6/7 and 7/7: at most 1/2 keeps the first three answers.
    assert curve.threshold_at_coverage(0.5) == (0.3, pytest.approx(3 / 7), pytest.approx(2 / 3))
    assert curve.threshold_at_coverage(6 / 7)[0] == 0.9
    assert curve.threshold_at_coverage(1.0)[0] == float("inf")  # keep everything: nothing is at or above it
    assert curve.threshold_at_coverage(0.2) is None  # the lowest tie alone is already 2/7


def test_the_protocol_refuses_what_it_cannot_honour():
    limits = Limits()
    image = "data:image/png;base64,AAAA"
    good = chat_body(image, "What colour is the square?")
    assert parse_chat(good, "run", limits, 4).max_tokens == 4
    assert parse_chat({**good, "temperature": 0, "seed": 3, "max_completion_tokens": 2}, "run", limits, 4).max_tokens \
        == 2  # fmt: skip
    refused = {
        "logprobs": {**good, "logprobs": True},
        "tools": {**good, "tools": [{"type": "function", "function": {"name": "f"}}]},
        "stop": {**good, "stop": ["\n"]},
        "top_p": {**good, "top_p": 0.9},
        "n": {**good, "n": True},  # true is not 1
        "response_format": {**good, "response_format": {"type": "json_object"}},
        "frobnicate": {**good, "frobnicate": 1},
        "max_tokens": {**good, "max_tokens": 0},
        "messages": {**good, "messages": [{"role": "system", "content": "Be brief."}, *good["messages"]]},
    }
    for param, body in refused.items():
        with pytest.raises(ServeRequestError) as caught:
            parse_chat(body, "run", limits, 4)
        assert caught.value.status == 400 and caught.value.param == param, param
    for content, words in [
        ("What is it?", "needs one image"),
        ([{"type": "text", "text": "What is it?"}], "exactly one image_url part and one text part"),
        ([{"type": "image_url", "image_url": {"url": image}}] * 2 + [{"type": "text", "text": "Q?"}], "got 2 and 1"),
        ([{"type": "image_url", "image_url": {"url": image, "detail": "low"}}, {"type": "text", "text": "Q?"}],
         "detail"),
        ([{"type": "input_audio", "input_audio": {}}], "only text and image_url parts"),
    ]:  # fmt: skip
        with pytest.raises(ServeRequestError, match=words):
            parse_chat({**good, "messages": [{"role": "user", "content": content}]}, "run", limits, 4)


def test_request_images_follow_the_run_s_rules_and_stay_inside_images(world, tmp_path):
    from halp.serve.inputs import load_request_image

    name = read_samples(world.table)[0].image_id
    from_url = load_request_image(data_url(world.images / name), None, True, 10**8)
    from_file = load_request_image(name, world.images, True, 10**8)
    assert np.array_equal(np.asarray(from_url), np.asarray(load_image(world.images, name)))
    assert np.array_equal(np.asarray(from_file), np.asarray(from_url))
    (tmp_path / "secret.png").write_bytes((world.images / name).read_bytes())
    refusals = [
        (("http://example.org/a.png", world.images), "image_url_not_supported"),
        (("file:///etc/passwd", world.images), "image_url_not_supported"),
        ((name, None), "image_url_not_supported"),
        (("../secret.png", world.images), "invalid_image"),
        ((str(tmp_path / "secret.png"), world.images), "invalid_image"),
        (("data:image/png;base64,bm90IGFuIGltYWdl", None), "invalid_image"),
        (("data:text/plain;base64,aGk=", None), "invalid_image"),
    ]
    for (reference, images), code in refusals:
        with pytest.raises(ServeRequestError) as caught:
            load_request_image(reference, images, True, 10**8)
        assert caught.value.code == code, reference
    with pytest.raises(ServeRequestError, match="pixels"):
        load_request_image(data_url(world.images / name), None, True, 100)


# ----- the batcher alone ---------------------------------------------------------------------------------------


def _jobs(count: int) -> list[Job]:
    return [Job(Image.new("RGB", (2, 2)), f"q{index}", 1) for index in range(count)]


def test_batches_form_by_count_and_the_queue_is_bounded():
    async def scenario() -> tuple[list[int], list[int]]:
        seen: list[int] = []
        batcher = Batcher(lambda jobs: seen.append(len(jobs)) or [], max_batch=2, max_wait_s=3600, max_queue=5)
        await batcher.start()
        first = batcher.submit(_jobs(1))
        for _ in range(20):  # the worker runs in between: with one row queued, it must wait for a second
            await asyncio.sleep(0)
        waited = list(seen)
        futures = first + batcher.submit(_jobs(4))
        with pytest.raises(ServeRequestError) as full:
            batcher.submit(_jobs(3))  # 3 waiting + 3 > 5: all or none
        assert full.value.status == 503 and full.value.code == "queue_full"
        await batcher.close()  # the last odd row runs without waiting for a partner
        await asyncio.gather(*futures)
        with pytest.raises(ServeRequestError, match="shutting down"):
            batcher.submit(_jobs(1))
        return waited, seen

    waited, seen = asyncio.run(scenario())
    assert waited == [] and seen == [2, 2, 1]


# ----- the command line and an unmodified OpenAI client -------------------------------------------------------------


def test_cli_option_errors_are_one_line_before_the_model_loads(world):
    runner = CliRunner()
    for args, words in [
        (["--threshold", "0.3", "--target-coverage", "0.5"], "give one of them"),
        (["--policy", "maybe"], "choose annotate or abstain"),
        (["--replicas", "2"], "--replicas needs --engine ray"),
        (["--target-coverage", "1.5"], "in (0, 1]"),
        (["--feature", "vision_projected", "--probe", "logreg"], "no saved probe"),
    ]:
        result = runner.invoke(cli, ["serve", str(world.run_dir), "--port", "0", *args])
        assert result.exit_code == 2, (args, result.output)
        assert words in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_an_unmodified_openai_client_against_halp_serve(world, samples, predicted, answers, median_risk):
    """The command a user runs, on loopback, driven by the official `openai` package: models, an answer with its
    risk (body and header), a stream, an abstention, an error; Ctrl-C ends it cleanly."""
    openai = pytest.importorskip("openai")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(halp.__file__).parents[1]), *sys.path])}
    server = subprocess.Popen(
        [sys.executable, "-m", "halp", "serve", str(world.run_dir), "--port", "0", "--device", "cpu",
         "--policy", "abstain", "--threshold", repr(median_risk), "--images", str(world.images)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        base_url = server.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1"), base_url
        client = openai.OpenAI(base_url=base_url, api_key="not-needed-on-loopback", max_retries=0, timeout=120)
        assert [model.id for model in client.models.list()] == ["run"]
        rows = sorted(samples[:8], key=lambda s: predicted[s.question_id])
        low, high = rows[0], rows[-1]

        def ask(sample, **extra):
            return client.chat.completions.with_raw_response.create(
                model="run", max_tokens=ANSWER_TOKENS, **extra,
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url(world.images / sample.image_id)}},
                    {"type": "text", "text": sample.question},
                ]}],
            )  # fmt: skip

        raw = ask(low)
        completion = raw.parse()
        assert completion.choices[0].message.content == answers[low.question_id]
        halp_object = completion.model_extra["halp"]
        assert halp_object["decision"] == "answered" and halp_object["feature"] == FEATURE
        assert halp_object["risk"] == pytest.approx(predicted[low.question_id], abs=RISK_ABS)
        assert float(raw.headers["x-halp-risk"]) == pytest.approx(halp_object["risk"], rel=1e-5)

        refused = ask(high).parse()
        assert refused.choices[0].message.content == DEFAULT_REFUSAL
        assert refused.model_extra["halp"]["decision"] == "abstained"
        assert refused.model_extra["halp"]["decode_tokens_saved"] == ANSWER_TOKENS

        chunks = list(client.chat.completions.create(
            model="run", stream=True, max_tokens=ANSWER_TOKENS,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": low.image_id}},
                                                   {"type": "text", "text": low.question}]}],
        ))  # fmt: skip
        assert chunks[0].model_extra["halp"]["risk"] == pytest.approx(halp_object["risk"], abs=RISK_ABS)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == answers[low.question_id]

        with pytest.raises(openai.BadRequestError) as caught:
            ask(low, temperature=0.8)
        assert caught.value.body["param"] == "temperature"
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=120)
    assert server.returncode == 0, err
    assert "listening on" in err and "threshold" in err
