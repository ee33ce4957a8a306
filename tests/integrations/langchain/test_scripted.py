"""The standard tests xfailed in ``test_standard.py`` for the model's judgement, run again with
that judgement scripted: a ``ScriptedReplies`` logits processor (passed as the chat model's
``logits_processors``) writes the reply a trained model would give, token by token, through
the real chat template, grammar, engine, parsers and LangChain plumbing. Each test runs the
suite's own test body and checks that every call it made was served a scripted reply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests as Suite

from kvloom.integrations.langchain import ChatKVLoom
from kvloom.integrations.runtime import EngineRuntime
from tests.integrations.langchain import test_standard as standard  # the module: its class is collected there
from tests.integrations.langchain.scripted import ScriptedReplies, tool_call

MAGIC_3 = tool_call("magic_function", '{"input": 3}')
JOKE = '{"setup":"Why did the cat sit on the laptop?","punchline":"To keep an eye on the mouse."}'
"""Compact, as the json_object grammar writes JSON (no space after a colon)."""
OUTPUT_VERSIONS = pytest.mark.parametrize("output_version", ["v0", "v1"])


@pytest.fixture
def suite(demo_runtime: EngineRuntime) -> standard.TestChatKVLoomIntegration:
    """The standard test class, configured as in ``test_standard.py`` (its flags and params)."""
    tests = standard.TestChatKVLoomIntegration()
    tests.runtime = demo_runtime
    return tests


@pytest.fixture
def scripted(suite: standard.TestChatKVLoomIntegration, demo_dir: Path) -> Any:
    def make(*replies: str, **params: Any) -> tuple[ChatKVLoom, ScriptedReplies]:
        script = ScriptedReplies(demo_dir, *replies)
        model = ChatKVLoom(**{**suite.chat_model_params, "logits_processors": [script], **params})
        return model, script

    return make


@OUTPUT_VERSIONS
def test_tool_calling(suite: Any, scripted: Any, output_version: str) -> None:
    model, script = scripted(MAGIC_3, output_version=output_version)
    Suite.test_tool_calling(suite, model)  # invoke, then stream
    assert script.num_served == 2


@pytest.mark.asyncio
async def test_tool_calling_async(suite: Any, scripted: Any) -> None:
    model, script = scripted(MAGIC_3)
    await Suite.test_tool_calling_async(suite, model)
    assert script.num_served == 2


def test_bind_runnables_as_tools(suite: Any, scripted: Any) -> None:
    model, script = scripted(tool_call("greeting_generator", '{"answer_style": "pirate"}'))
    Suite.test_bind_runnables_as_tools(suite, model)
    assert script.num_served == 1


def test_tool_choice(suite: Any, scripted: Any) -> None:
    model, script = scripted(MAGIC_3)
    Suite.test_tool_choice(suite, model)  # tool_choice="any", then tool_choice="magic_function"
    assert script.num_served == 2


@pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
def test_structured_output(suite: Any, scripted: Any, schema_type: str) -> None:
    model, script = scripted(JOKE)
    Suite.test_structured_output(suite, model, schema_type)
    assert script.num_served == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
async def test_structured_output_async(suite: Any, scripted: Any, schema_type: str) -> None:
    model, script = scripted(JOKE)
    await Suite.test_structured_output_async(suite, model, schema_type)
    assert script.num_served == 2


def test_structured_output_optional_param(suite: Any, scripted: Any) -> None:
    setup_only = '{"setup":"Why did the cat sit on the laptop?"}'
    model, script = scripted(setup_only, JOKE, JOKE, JOKE)
    Suite.test_structured_output_optional_param(suite, model)  # pydantic twice, a JSON schema, a TypedDict
    assert script.num_served == 4


def test_structured_output_pydantic_2_v1(suite: Any, scripted: Any) -> None:
    model, script = scripted(JOKE)
    Suite.test_structured_output_pydantic_2_v1(suite, model)
    assert script.num_served == 4


def test_json_mode(suite: Any, scripted: Any) -> None:
    model, script = scripted(JOKE)
    Suite.test_json_mode(suite, model)
    assert script.num_served == 4


@OUTPUT_VERSIONS
def test_agent_loop(suite: Any, scripted: Any, output_version: str) -> None:
    call = tool_call("get_weather", '{"location": "San Francisco, CA"}')
    model, script = scripted(call, "It's sunny in San Francisco.", output_version=output_version)
    Suite.test_agent_loop(suite, model)  # the call (tool_choice="auto"), then the answer
    assert script.num_served == 2


def test_unicode_tool_call_integration(suite: Any, scripted: Any) -> None:
    model, script = scripted(
        tool_call("unicode_customer", '{"customer_name": "你好啊集团", "description": "A Chinese technology company"}'),
        tool_call("unicode_customer", '{"customer_name": "こんにちは株式会社", "description": "A Japanese company"}'),
        max_tokens=128,  # the names are byte-level tokens: over 100 tokens per call
    )
    Suite.test_unicode_tool_call_integration(suite, model)
    assert script.num_served == 2
