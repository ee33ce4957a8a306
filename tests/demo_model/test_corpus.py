"""The demo model's corpus: reproducible, split so held-out examples share no names or values with
training ones, free of the test suites' prompts, and rendered and masked the way the model is trained."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from kvloom.demo_model import words
from kvloom.demo_model.corpus import EXCLUDED_WORDS, TASKS, Example, examples, generate
from kvloom.demo_model.tokenizer import render

PER_TASK = 150


def _sample(split: words.Split, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [generate(task, rng, split) for task in sorted(TASKS) for _ in range(PER_TASK)]


SHARED_VOCABULARY = {*words.DAYS, *words.LANGUAGES, *words.STYLES, *words.ROLES, *words.RIDDLE_SUBJECTS}
"""Small closed sets every split uses (a day, a language, and counts up to 12): the language the model
must know, not values."""


def _values(example: Example) -> set[str]:
    """What a model must copy or choose in ``example``: the called tool's name and argument values, the
    answer span of a question, the extracted record's values (each string or number of 2+ digits)."""
    found: set[str] = set()
    if example.call is not None and example.task != "structured":
        found.add(example.call["name"])
        found |= {str(v) for v in example.call["arguments"].values()}
    if example.task == "qa" and example.answer:
        found.add(example.answer)
    if example.record:
        found |= {str(v) for v in example.record.values()}
    return {v for v in found if v not in SHARED_VOCABULARY and not (v.isdigit() and int(v) <= 12)
            and not v.startswith(("the ", "I will", "please", "we meet", "a "))}


def test_same_seed_same_examples() -> None:
    weights = {task: 1.0 for task in TASKS}
    assert examples(7, "train", 60, weights) == examples(7, "train", 60, weights)
    assert examples(7, "train", 60, weights) != examples(8, "train", 60, weights)


def test_heldout_shares_no_names_tool_names_or_values_with_train() -> None:
    train = set().union(*(_values(e) for e in _sample("train", 1)))
    held = set().union(*(_values(e) for e in _sample("heldout", 2)))
    assert len(train) > 600 and len(held) > 400  # the check saw real variety
    assert not train & held, sorted(train & held)[:20]
    # Single values were drawn from the held-out pool (phrases are made of such values).
    assert {words.split_of(v) for v in held if " " not in v} == {"heldout"}


def test_no_test_suite_names_or_prompts() -> None:
    """LangChain's standard tests (magic_function, its 'input' argument, the Joke schema, a greeting
    generator) must find the model unprepared."""
    text = "\n".join(render(e.messages, e.tools) for e in _sample("train", 3) + _sample("heldout", 4)).lower()
    for word in sorted(EXCLUDED_WORDS):
        assert not re.search(rf"\b{re.escape(word)}\b", text), word
    assert "what is the value of magic_function" not in text


@pytest.mark.parametrize("task", ["tool_call", "tool_loop", "structured"])
def test_tool_examples_call_a_listed_tool_with_its_arguments(task: str) -> None:
    rng = random.Random(5)
    for _ in range(200):
        example = generate(task, rng, "train")
        assert example.call is not None and example.tools is not None
        listed = {t["function"]["name"]: t["function"]["parameters"] for t in example.tools}
        params = listed[example.call["name"]]
        assert set(example.call["arguments"]) == set(params["required"]) == set(params["properties"])


def test_json_replies_are_the_record() -> None:
    rng = random.Random(6)
    for _ in range(200):
        example = generate("json", rng, "heldout")
        assert json.loads(example.messages[-1]["content"]) == example.record


def _tools_for_render() -> list[dict[str, Any]]:
    return [{"type": "function", "function": {
        "name": "magic_function", "description": "Apply a magic function to an input.",
        "parameters": {"type": "object", "properties": {"input": {"type": "integer"}, "mode": {"enum": ["a", "b"]},
                                                        "note": {"type": ["string", "null"]}},
                       "required": ["input"]}}}]


def test_template_lists_a_tool_as_its_call() -> None:
    text = render([{"role": "user", "content": "hi"}], _tools_for_render(), add_generation_prompt=True)
    assert ('- Apply a magic function to an input. Call: {"name": "magic_function", "arguments": '
            '{"input": integer, "mode": "a" | "b" (optional), "note": string | null (optional)}}') in text
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_template_call_parses_with_kvloom_tool_parser() -> None:
    """What the model is trained to write is what the engine's Hermes parser reads."""
    from kvloom.tools.stream_parser import ToolCallStreamParser

    rng = random.Random(8)
    for _ in range(50):
        example = generate("tool_call", rng, "heldout")
        text = render(example.messages, example.tools)
        reply = text.rsplit("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")
        assert example.call is not None and example.tools is not None
        parser = ToolCallStreamParser("hermes", frozenset(t["function"]["name"] for t in example.tools))
        parser.feed(reply, final=True)
        content, calls = parser.result()
        assert content == ""
        assert [(c.name, c.parsed) for c in calls] == [(example.call["name"], example.call["arguments"])]
