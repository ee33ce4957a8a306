"""Bad requests get OpenAI's error shape: a 400 whose ``param`` names the field at fault, a 404
``model_not_found`` for an unknown model; nothing is queued for any of them. The framework's
own errors (a body that is not UTF-8 JSON, an unknown URL, a wrong method) and bugs (a 500)
get the same shape, and the official client raises its typed errors with their message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from fastapi import FastAPI

from kvloom import AsyncEngine
from tests.engine.helpers import assert_settles_idle
from tests.integrations.openai_server.conftest import MODEL, user

pytestmark = pytest.mark.asyncio(loop_scope="package")

TOOLS: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


async def bad_request(call: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as err:
        await call
    assert err.value.status_code == 400
    body: dict[str, Any] = err.value.body  # type: ignore[assignment]
    assert body["type"] == "invalid_request_error" and body["message"]
    return body


@pytest.mark.parametrize(("param", "fields"), [
    ("temperature", {"temperature": 2.5}),
    ("top_p", {"top_p": 0.0}),  # OpenAI's range allows 0, kvloom's does not: still named
    ("max_completion_tokens", {"max_completion_tokens": 5000}),  # past the model's 2048 positions
    ("tool_choice", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
    ("tools", {"tools": TOOLS, "response_format": {"type": "json_object"}}),
    ("tools[0].function.name", {"tools": [{"type": "function", "function": {"name": "has space"}}]}),
    ("response_format.json_schema.schema", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
    ("response_format.type", {"response_format": {"type": "xml"}}),
    ("response_format.type", {"response_format": {"schema": {"type": "object"}}}),  # no type: not a bare schema
    ("messages[0].content[0].type", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
    ("messages[0].role", {"messages": [{"role": "robot", "content": "hi"}]}),
    ("logit_bias", {"logit_bias": {"42": 5}}),
    ("audio", {"audio": {"voice": "alloy", "format": "wav"}}),
    ("frobnicate", {"frobnicate": True}),
])
async def test_a_bad_field_is_a_400_naming_it(
    client: openai.AsyncOpenAI, engine: AsyncEngine, param: str, fields: dict[str, Any],
) -> None:
    body = {"model": MODEL, "messages": user("hi"), "max_tokens": 4, **fields}
    error = await bad_request(client.post("/chat/completions", cast_to=object, body=body))
    assert error["param"] == param, error
    assert error["message"].startswith(param), error
    await assert_settles_idle(engine)


async def test_harmless_fields_are_accepted(client: openai.AsyncOpenAI) -> None:
    done = await client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=1, user="u-1",
                                                metadata={"team": "a"}, store=False, modalities=["text"])
    assert done.choices[0].finish_reason in ("length", "stop")


async def test_completions_refuse_what_they_cannot_do(client: openai.AsyncOpenAI) -> None:
    for param, fields in (("echo", {"echo": True}), ("suffix", {"suffix": "end"}),
                          ("prompt", {"prompt": ["one", "two"]}), ("prompt", {"prompt": ""})):
        args = {"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}
        assert (await bad_request(client.completions.create(**args)))["param"] == param


async def test_an_unknown_model_is_a_404_model_not_found(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(model="gpt-9", messages=user("hi"), max_tokens=2)
    assert err.value.status_code == 404
    assert err.value.body == {"message": err.value.body["message"], "type": "invalid_request_error",  # type: ignore[index]
                              "param": "model", "code": "model_not_found"}
    assert "gpt-9" in err.value.message and MODEL in err.value.message
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-9")


def raw_http(app: FastAPI, raise_app_exceptions: bool = True) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions),
                              base_url="http://test")


def openai_error(response: httpx2.Response, status: int) -> dict[str, Any]:
    """The error object of ``response``, checked to be OpenAI's shape with ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    assert list(body) == ["error"] and list(body["error"]) == ["message", "type", "param", "code"], body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    error: dict[str, Any] = body["error"]
    return error


async def test_an_unsupported_response_format_type_lists_the_supported_ones(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2,
                                             response_format={"type": "xml"})  # type: ignore[arg-type]
    assert err.value.param == "response_format.type" and err.value.code is None
    message = err.value.message
    assert "'xml'" in message and all(kind in message for kind in ("text", "json_object", "json_schema")), message
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                        extra_body={"response_format": {"type": "xml"}})
    assert err.value.param == "response_format.type"


@pytest.mark.parametrize(("content", "says"), [
    ('{"model": "démo", "messages": []}'.encode("latin-1"), "UTF-8"),  # a Latin-1 client
    (b'{"model": "demo", "messages": [', "not valid JSON"),
    (b"", "JSON object"),
    (b"[1, 2]", "JSON object"),
], ids=["latin-1", "cut-json", "empty", "array"])
async def test_a_body_that_is_not_a_utf8_json_object_is_an_openai_400(app: FastAPI, content: bytes, says: str) -> None:
    async with raw_http(app) as http:
        response = await http.post("/v1/chat/completions", content=content,
                                   headers={"content-type": "application/json"})
    error = openai_error(response, 400)
    assert error["type"] == "invalid_request_error" and says in error["message"], error


async def test_an_unknown_url_is_an_openai_404_the_client_raises(app: FastAPI, client: openai.AsyncOpenAI) -> None:
    async with raw_http(app) as http:
        error = openai_error(await http.post("/v1/chat/completion", json={}), 404)
    assert error["message"].startswith("Invalid URL (POST /v1/chat/completion)"), error
    assert "POST /v1/chat/completions" in error["message"]  # the endpoints there are
    with pytest.raises(openai.NotFoundError) as err:
        await client.post("/embeddings", cast_to=object, body={"model": MODEL, "input": "hi"})
    assert err.value.status_code == 404 and "Invalid URL (POST /v1/embeddings)" in err.value.message


async def test_a_wrong_method_is_an_openai_405_naming_the_allowed_one(app: FastAPI, client: openai.AsyncOpenAI) -> None:
    async with raw_http(app) as http:
        response = await http.get("/v1/chat/completions")
    error = openai_error(response, 405)
    assert response.headers["allow"] == "POST" and "GET /v1/chat/completions" in error["message"], error
    with pytest.raises(openai.APIStatusError) as err:
        await client.get("/completions", cast_to=object)
    assert err.value.status_code == 405 and "allowed: POST" in err.value.message


async def test_a_bug_is_an_openai_500_that_hides_its_text(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("secret detail")

    monkeypatch.setattr("kvloom.integrations.openai_server.routes.chat_params", broken)
    async with raw_http(app, raise_app_exceptions=False) as http:
        response = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("hi")})
    error = openai_error(response, 500)
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert "secret" not in json.dumps(error)


async def test_health_before_the_engine_starts_is_a_503_in_openai_shape(demo_dir: Path) -> None:
    from kvloom.integrations.openai_server import create_app

    idle = create_app(AsyncEngine.from_pretrained(demo_dir), model_name=MODEL)  # never started: nothing loads
    async with raw_http(idle) as http:
        error = openai_error(await http.get("/health"), 503)
    assert error["code"] == "engine_unavailable"
