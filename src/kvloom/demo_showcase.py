"""What ``python -m kvloom demo`` shows on the shipped demo model: questions about a passage, a tool call
and its answer, a JSON extraction with and without a grammar.

Each ``show_*`` takes an ``LLM`` on the demo model, prints what it asked and what came back, and
returns the number of tokens generated. The names and values below are not in the model's
training data (the corpus writes names from syllables; these are ordinary names it never saw).
"""

from __future__ import annotations

import json
from typing import Any

PASSAGE = ("The keeper of the lighthouse is Dorvan. Amber lives in Kestrel. The violin costs 120 coins. "
           "Lumi was born in 1987. The weather was windy that Sunday. Dorvan has a owl named Pip.")
QUESTIONS = ("Who is the keeper of the lighthouse?", "Where does Amber live?", "How much does the violin cost?",
             "When was Lumi born?", "What is the name of Dorvan's owl?")

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "weather_report", "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "order_lookup", "description": "Look up the status of an order by its number.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}},
]
TOOL_QUESTION = "What is the weather in Marlow?"


def weather_report(city: str) -> dict[str, Any]:
    """The demo's tool: a fixed forecast (a real one would call a weather service)."""
    return {"city": city, "forecast": "sunny", "temperature": 24}


EXTRACTION = "Fenwick ordered 7 of the jacket for delivery to Linden.\n\nExtract the order as JSON with the fields customer, item, quantity."
ORDER_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["customer", "item", "quantity"],
                "properties": {"customer": {"type": "string"}, "item": {"type": "string"},
                               "quantity": {"type": "integer"}}}


def _flat(text: str) -> str:
    return " ".join(text.split())


def show_passage(llm: Any, params: Any) -> int:
    """Five questions about one passage, answered in one batch."""
    print(f"1. Questions about a passage (one batch of {len(QUESTIONS)})\n   passage: {PASSAGE}")
    conversations = [[{"role": "user", "content": f"Read the passage and answer the question.\n\nPassage: {PASSAGE}"
                                                  f"\n\nQuestion: {q}"}] for q in QUESTIONS]
    completions = llm.chat(conversations, params, use_tqdm=False)
    for question, completion in zip(QUESTIONS, completions, strict=True):
        print(f"   Q: {question}\n   A: {_flat(completion.text)}")
    return sum(len(c.token_ids) for c in completions)


def show_tool(llm: Any, params: Any) -> int:
    """One agent turn: the model picks a tool, the demo runs it, the model answers from its result."""
    print(f"\n2. A tool call and its answer\n   tools: {', '.join(t['function']['name'] for t in TOOLS)}\n"
          f"   user: {TOOL_QUESTION}")
    messages: list[dict[str, Any]] = [{"role": "user", "content": TOOL_QUESTION}]
    first = llm.chat([messages], params, tools=TOOLS, use_tqdm=False)[0]
    tokens = len(first.token_ids)
    if not first.tool_calls:
        print(f"   assistant (no tool call): {_flat(first.text)}")
        return tokens
    call = first.tool_calls[0]
    print(f"   assistant calls: {call.name}({call.arguments})")
    result = weather_report(**call.parsed) if call.name == "weather_report" else {"error": "unknown tool"}
    print(f"   tool returns: {json.dumps(result)}")
    messages += [{"role": "assistant", "content": "", "tool_calls": [call.to_openai()]},
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    final = llm.chat([messages], params, tools=TOOLS, use_tqdm=False)[0]
    print(f"   assistant: {_flat(final.text)}")
    return tokens + len(final.token_ids)


def show_json(llm: Any, params: Any) -> int:
    """The same extraction unconstrained and with the schema as ``response_format``."""
    import kvloom

    print(f"\n3. JSON extraction\n   user: {_flat(EXTRACTION)}")
    plain = llm.chat([[{"role": "user", "content": EXTRACTION}]], params, use_tqdm=False)[0]
    constrained_params = kvloom.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature,
        response_format={"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER_SCHEMA}})
    constrained = llm.chat([[{"role": "user", "content": EXTRACTION}]], constrained_params, use_tqdm=False)[0]
    print(f"   assistant: {plain.text}\n   assistant, with the schema as a grammar: {constrained.text}")
    return len(plain.token_ids) + len(constrained.token_ids)
