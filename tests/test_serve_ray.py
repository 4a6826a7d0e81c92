"""`halp serve --engine ray`: the same app on 2 Ray Serve replicas of a real local Ray instance (CPU only).

Each replica loads its own copy of the served run's model and runs its own batcher. The references are the local
path's: the answers `halp extract` stored and the risks of the run's `RiskScorer` (`halp predict`'s), with the
tolerance of tests/test_serve.py (abs 1e-4 on a risk; answers equal).
"""

from __future__ import annotations

import base64
import socket

import pytest

from halp.data import load_image, read_samples
from halp.errors import install_hint
from halp.predict import RiskScorer
from halp.serve.settings import ServeSettings
from halp.testing.serving import SERVED_FEATURES
from halp.world.study import read_answers

ray = pytest.importorskip("ray", reason=f"--engine ray is the optional extra ray: {install_hint('ray,serve')}")
pytest.importorskip("ray.serve", reason=f"--engine ray needs Ray Serve: {install_hint('ray,serve')}")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from halp.serve.ray_serve import deploy, running_replicas, shutdown  # noqa: E402 - only once ray is known to import

RISK_ABS = 1e-4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_ray_serve_replicas_answer_as_the_local_engine(served_world):
    world = served_world
    rows = read_samples(world.table)[:6]
    answers = dict(zip(*(read_answers(world.run_dir)[column] for column in ("question_id", "answer")), strict=True))
    scorer = RiskScorer.from_run(world.run_dir, SERVED_FEATURES[0], "logreg", device="cpu")
    expected = scorer.score_batch([load_image(world.images, s.image_id) for s in rows], [s.question for s in rows])
    del scorer

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        settings = ServeSettings(world.run_dir, feature=SERVED_FEATURES[0], probe="logreg", images=world.images,
                                 device="cpu", max_batch=4)  # fmt: skip
        url, key = deploy(settings, replicas=2, port=free_port(), gpus_per_replica=0, cpus_per_replica=0.5)
        assert key is None  # loopback: no key
        assert running_replicas() == 2
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        assert [model.id for model in client.models.list()] == ["run"]
        for sample, risk in zip(rows, expected, strict=True):
            image = "data:image/png;base64," + base64.b64encode((world.images / sample.image_id).read_bytes()).decode()
            completion = client.chat.completions.create(
                model="run", max_tokens=4,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                       {"type": "text", "text": sample.question}]}],
            )  # fmt: skip
            assert completion.choices[0].message.content == answers[sample.question_id]
            assert completion.model_extra["halp"]["risk"] == pytest.approx(float(risk), abs=RISK_ABS)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="run", n=2, messages=[{"role": "user", "content": "hi"}])
        health = httpx.get(url.removesuffix("/v1") + "/healthz", timeout=60)
        assert health.status_code == 200 and health.json()["status"] == "ok"
    finally:
        shutdown()
        ray.shutdown()
