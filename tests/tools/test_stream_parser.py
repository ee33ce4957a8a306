"""The streaming tool-call parser: any split of the text gives the same content and calls."""

from __future__ import annotations

import random

import pytest

from kvloom.engine.streams import merge_tool_deltas
from kvloom.tools.stream_parser import ToolCallStreamParser

ESCAPED = r'{"q": "a}b\"{", "n": [1, {"x": 2}]}'  # a brace and an escaped quote inside a string
CASES = {
    "hermes": ("Let me check.\n<tool_call>\n" + '{"name": "search", "arguments": ' + ESCAPED + "}\n</tool_call>\n"
               '<tool_call>\n{"name": "book", "arguments": {}}\n</tool_call>',
               "Let me check.\n", [("search", ESCAPED), ("book", "{}")]),
    "llama": ('{"name": "search", "parameters": {"q": "x"}}\n{"name": "book", "parameters": {"when": "now"}}',
              "", [("search", '{"q": "x"}'), ("book", '{"when": "now"}')]),
}


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_every_split_gives_the_same_content_and_calls(fmt: str) -> None:
    text, content, calls = CASES[fmt]
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 12)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        parser = ToolCallStreamParser(fmt, frozenset({"search", "book"}))  # type: ignore[arg-type]
        texts, deltas = [], []
        for i, piece in enumerate(pieces):
            out, d = parser.feed(piece, final=i == len(pieces) - 1)
            texts.append(out)
            deltas = merge_tool_deltas(deltas, d)
        final_content, final_calls = parser.result()
        assert "".join(texts) == final_content == content
        assert [(c.name, c.arguments) for c in final_calls] == calls
        assert [(d.name, d.arguments) for d in deltas] == calls


def test_text_that_only_looks_like_a_call_stays_text() -> None:
    parser = ToolCallStreamParser("hermes", frozenset({"search"}))
    out, deltas = parser.feed('I use <tool_call> tags and <tool_call>{"name": "other", "arguments": {}}', final=True)
    assert deltas == [] and parser.result() == (out, []) and out.startswith("I use <tool_call> tags")



@pytest.mark.parametrize(("fmt", "text", "content"),
                         [("hermes", 'Checking.\n<tool_call>\n{"na', "Checking.\n"), ("llama", '{"name": "sea', "")])
def test_a_call_cut_before_its_name_leaves_no_markup_in_the_text(fmt: str, text: str, content: str) -> None:
    for split in range(1, len(text)):
        parser = ToolCallStreamParser(fmt, frozenset({"search"}))  # type: ignore[arg-type]
        streamed = parser.feed(text[:split])[0] + parser.feed(text[split:], final=True)[0]
        assert streamed == parser.result()[0] == content
        assert parser.result()[1] == []
