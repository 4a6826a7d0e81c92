"""`halp serve`: an OpenAI-compatible VLM endpoint that scores every request from the prefill it needs anyway.

settings.py: what the service is asked to do (the run, the policy, the limits); policy.py: the threshold and
what a risk decides; protocol.py: the OpenAI Chat Completions subset, halp's risk endpoint, their JSON;
inputs.py: a request's image, with the run's image rules; engine.py: the one place that runs the model;
batcher.py: the bounded queue and batching of concurrent requests; metrics.py: the Prometheus registry;
app.py: the Starlette routes, keys, limits, streaming and the local uvicorn server; ray_serve.py: the same app
on Ray Serve replicas. See docs/serving.md.
"""
