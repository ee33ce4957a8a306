"""Bad requests get OpenAI's error shape: a 400 whose ``param`` names the field at fault, a 404
``model_not_found`` for an unknown model; nothing is queued for any of them."""

from __future__ import annotations

from typing import Any

import openai
import pytest

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
