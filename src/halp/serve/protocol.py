"""The OpenAI Chat Completions subset `halp serve` honours, halp's risk endpoint, and the JSON of their answers.

A request is validated in full before it is queued. Every parameter the service cannot honour exactly is a 400
in OpenAI's error shape naming the parameter, never silently changed: decoding is greedy (temperature 0 or unset),
one choice, no tools, no log-probabilities, no stop strings. The prompt is the run's template (one user turn: one
image and one question), because the probe was trained on the states of that prompt; system and assistant
messages would change it and are refused.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from halp.errors import ServeRequestError
from halp.serve.settings import Limits

#: Parameters accepted only with the value that changes nothing (greedy decoding, one choice, plain text).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "temperature": (None, 0, 0.0),
    "top_p": (None, 1, 1.0),
    "n": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "stop": (None, [], ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    "verbosity": (None,),
}
#: Why a parameter is refused, where the reason is not plain.
WHY_REFUSED = {
    "temperature": "decoding is greedy (the answer halp extract gives): send temperature 0 or leave it out",
    "top_p": "decoding is greedy: send top_p 1 or leave it out",
    "n": "one greedy answer per request: n must be 1",
    "stop": "stop strings are not supported; the answer ends at the model's end of turn or max_tokens",
}
#: Accepted without effect: greedy decoding is deterministic whatever the seed; `user` only names the end user.
NO_EFFECT = ("seed", "user")
CHAT_KEYS = {"model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options",
             *NEUTRAL_VALUES, *NO_EFFECT}  # fmt: skip
RISK_KEYS = {"model", "items"}
DETAILS = (None, "auto")


@dataclass(frozen=True)
class ChatRequest:
    image: str  # a data: URL, or a file name under --images
    question: str
    max_tokens: int
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class RiskItem:
    image: str
    question: str


def invalid(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> ServeRequestError:
    return ServeRequestError(message, status, param, code)


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise invalid(f"the request body is not JSON: {err}", code="invalid_json") from err
    if not isinstance(data, dict):
        raise invalid("the request body is not a JSON object", code="invalid_json")
    return data


def check_model(data: dict[str, Any], served: str, required: bool) -> None:
    model = data.get("model")
    if model is None and not required:
        return
    if not isinstance(model, str):
        raise invalid("model is required: the name GET /v1/models lists", "model")
    if model != served:
        raise invalid(f"the model {model!r} does not exist here; this server serves {served!r}", "model",
                      "model_not_found", status=404)  # fmt: skip


def parse_chat(data: dict[str, Any], served: str, limits: Limits, default_max_tokens: int) -> ChatRequest:
    """A validated chat completion request; a 400 naming the parameter otherwise."""
    unknown = sorted(set(data) - CHAT_KEYS)
    if unknown:
        raise invalid(f"unknown or unsupported parameter {unknown[0]!r}", unknown[0], "unsupported_parameter")
    check_model(data, served, required=True)
    for name, accepted in NEUTRAL_VALUES.items():
        value = data.get(name)
        if not any(_same(value, neutral) for neutral in accepted):
            reason = WHY_REFUSED.get(name, f"{name} is not supported by halp serve")
            raise invalid(f"{name}={json.dumps(value)[:80]}: {reason}", name, "unsupported_parameter")
    if data.get("seed") is not None and (not isinstance(data["seed"], int) or isinstance(data["seed"], bool)):
        raise invalid("seed must be an integer", "seed")
    if data.get("user") is not None and not isinstance(data["user"], str):
        raise invalid("user must be a string", "user")
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream must be true or false", "stream")
    include_usage = False
    options = data.get("stream_options")
    if options is not None:
        if not stream:
            raise invalid("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("stream_options supports only include_usage", "stream_options")
        include_usage = options.get("include_usage") is True
    max_tokens = _max_tokens(data, limits, default_max_tokens)
    image, question = _user_turn(data.get("messages"), limits)
    return ChatRequest(image, question, max_tokens, bool(stream), include_usage)


def _same(value: Any, neutral: Any) -> bool:
    """JSON equality, with booleans apart from numbers (true is not 1)."""
    if isinstance(value, bool) or isinstance(neutral, bool) or value is None or neutral is None:
        return value is neutral
    return bool(value == neutral)


def _max_tokens(data: dict[str, Any], limits: Limits, default: int) -> int:
    given = {name: data[name] for name in ("max_tokens", "max_completion_tokens") if data.get(name) is not None}
    if len(set(map(repr, given.values()))) > 1:
        raise invalid("max_tokens and max_completion_tokens differ; give one", "max_tokens")
    if not given:
        return default
    name, value = next(iter(given.items()))
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise invalid(f"{name} must be a positive integer", name)
    if value > limits.max_tokens:
        raise invalid(f"{name}={value} is more than this server allows ({limits.max_tokens})", name,
                      "max_tokens_too_large")  # fmt: skip
    return value


def _user_turn(messages: Any, limits: Limits) -> tuple[str, str]:
    """(image, question) of the one user message: one image_url part and one text part."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    roles = [message.get("role") if isinstance(message, dict) else None for message in messages]
    if roles != ["user"]:
        raise invalid(
            f"messages must be exactly one user message (got roles {roles}): halp serves the run's prompt, one user "
            "turn of an image and a question, the prompt its probe was trained on; system, developer and assistant "
            "messages would change it",
            "messages",
        )
    message = messages[0]
    unknown = sorted(set(message) - {"role", "content", "name"})
    if unknown:
        raise invalid(f"unsupported message field {unknown[0]!r}", "messages")
    content = message.get("content")
    if isinstance(content, str):
        raise invalid("the user message needs one image: send content as a list of an image_url part and a text "
                      "part", "messages")  # fmt: skip
    if not isinstance(content, list):
        raise invalid("content must be a list of an image_url part and a text part", "messages")
    images, texts = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}:
            texts.append(part["text"])
        elif kind == "image_url" and set(part) <= {"type", "image_url"}:
            images.append(_image_url(part.get("image_url")))
        else:
            raise invalid(f"unsupported content part {json.dumps(part)[:120]}: only text and image_url parts",
                          "messages")  # fmt: skip
    if len(images) != 1 or len(texts) != 1:
        raise invalid(
            f"the user message must hold exactly one image_url part and one text part (got {len(images)} and "
            f"{len(texts)}): the probe was trained on one image and one question",
            "messages",
        )
    return images[0], check_question(texts[0], limits, "messages")


def _image_url(value: Any) -> str:
    if not isinstance(value, dict) or not isinstance(value.get("url"), str) or set(value) - {"url", "detail"}:
        raise invalid("image_url must be an object {\"url\": ...}", "messages")
    if value.get("detail") not in DETAILS:
        raise invalid(f"image_url detail {value['detail']!r} is not supported: the image is processed as the run's "
                      "images were (leave detail out or send auto)", "messages")  # fmt: skip
    return value["url"]


def check_question(question: str, limits: Limits, param: str) -> str:
    if not question.strip():
        raise invalid("the question is empty", param, "empty_question")
    if len(question) > limits.max_question_chars:
        raise invalid(f"the question has {len(question)} characters; the limit is {limits.max_question_chars}",
                      param, "question_too_long")  # fmt: skip
    if "\x00" in question:
        raise invalid("the question contains a NUL character", param)
    return question


def parse_risk(data: dict[str, Any], served: str, limits: Limits) -> list[RiskItem]:
    """The items of a POST /v1/risk: {"items": [{"image": URL or name, "question": text}, ...]}."""
    unknown = sorted(set(data) - RISK_KEYS)
    if unknown:
        raise invalid(f"unknown parameter {unknown[0]!r}", unknown[0], "unsupported_parameter")
    check_model(data, served, required=False)
    items = data.get("items")
    if not isinstance(items, list) or not items:
        raise invalid("items must be a non-empty list of {\"image\": ..., \"question\": ...}", "items")
    if len(items) > limits.max_risk_items:
        raise invalid(f"{len(items)} items; the limit is {limits.max_risk_items} per request", "items")
    parsed = []
    for index, item in enumerate(items):
        if (
            not isinstance(item, dict)
            or set(item) != {"image", "question"}
            or not isinstance(item["image"], str)
            or not isinstance(item["question"], str)
        ):
            raise invalid(f"items[{index}] must be {{\"image\": string, \"question\": string}}", "items")
        parsed.append(RiskItem(item["image"], item["question"]))
    return parsed


# ----- answers -------------------------------------------------------------------------------------------------


def error_body(error: ServeRequestError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_body(
    ident: str, model: str, answer: str, finish_reason: str, usage: dict[str, int], halp: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": ident,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
        "halp": halp,
    }


def chunk_body(
    ident: str, model: str, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        **extra,
    }


def usage_chunk(ident: str, model: str, usage: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [], "usage": usage}  # fmt: skip


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
