"""The tiny checkpoints' tool templates write tools, calls and results the way their families do."""

from __future__ import annotations

import json

import pytest

from kvloom.models.tiny import train_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call-0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call-0", "content": "sunny"},
]


@pytest.mark.parametrize(("template", "call", "result"), [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "<tool_response>\nsunny\n</tool_response>"),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "<|im_start|>ipython\nsunny"),
])
def test_tools_calls_and_results_are_rendered(template: str, call: str, result: str) -> None:
    tok = train_tokenizer(512, 0, template)  # type: ignore[arg-type]
    text = tok.apply_chat_template(TURNS, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert json.dumps(TOOLS[0]) in text and "Be brief." in text
    assert call in text and result in text
    assert text.endswith("<|im_start|>assistant\n")
    plain = tok.apply_chat_template(TURNS[:2], add_generation_prompt=True, tokenize=False)
    assert "get_weather" not in plain, "no tools, no tool text"
