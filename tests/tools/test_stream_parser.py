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


CUT = {  # a call cut by max_tokens inside its arguments, after a complete one
    "hermes": ('<tool_call>\n{"name": "book", "arguments": {}}\n</tool_call>\n'
               '<tool_call>\n{"name": "search", "arguments": {"q": "a}b', '{"q": "a}b'),
    "llama": ('{"name": "book", "parameters": {}}\n{"name": "search", "parameters": {"q": [1, {"x"', '{"q": [1, {"x"'),
}


@pytest.mark.parametrize("fmt", sorted(CUT))
def test_a_call_cut_inside_its_arguments_is_marked_incomplete_in_the_result_and_the_stream(fmt: str) -> None:
    from kvloom.outputs import IncompleteToolCallError

    text, cut_arguments = CUT[fmt]
    for split in range(1, len(text)):
        parser = ToolCallStreamParser(fmt, frozenset({"search", "book"}))  # type: ignore[arg-type]
        first = parser.feed(text[:split])[1]
        last = parser.feed(text[split:], final=True)[1]
        deltas = merge_tool_deltas(merge_tool_deltas([], first), last)
        complete, cut = parser.result()[1]
        assert (complete.incomplete, complete.parsed) == (False, {})
        assert (cut.name, cut.arguments, cut.incomplete) == ("search", cut_arguments, True)
        with pytest.raises(IncompleteToolCallError, match=r"cut by max_tokens \(finish_reason='length'\)"):
            _ = cut.parsed
        assert [(d.index, d.incomplete) for d in last if d.incomplete] == [(1, True)], "the last chunk says so"
        assert [d.incomplete for d in deltas if d.index == 0] == [False]
    assert issubclass(IncompleteToolCallError, ValueError), "existing `except ValueError` code keeps working"


def test_a_call_cut_after_its_arguments_closed_is_complete() -> None:
    parser = ToolCallStreamParser("hermes", frozenset({"search"}))
    _, deltas = parser.feed('<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool', final=True)
    [call] = parser.result()[1]
    assert (call.incomplete, call.parsed) == (False, {"q": "x"}) and not any(d.incomplete for d in deltas)
