"""An agent loop with tools: the model calls a Python function, reads its result, answers.

Run: python examples/agent_tools.py [MODEL_DIR]
The system prompt and the tools are prefilled once and pinned (a prefix handle); every turn
starts from that KV, and each turn finds more of its conversation in the cache than the last.
Without MODEL_DIR it uses the shipped demo model (5M parameters, trained on a synthetic corpus:
it picks tools and copies their arguments from the request more often than not); whatever the model
writes, every call names a real tool and its arguments validate (the grammar sees to it).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from kvloom import AsyncEngine, Completion, SamplingParams
from kvloom.demo import demo_model_dir

# Typed functions are tools: the name, the docstring's first paragraph and a JSON schema of the
# parameters go to the model. Bounds (max_length, ge/le) keep a constrained call short.
City = Annotated[str, Field(max_length=16)]


def get_weather(city: City, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict[str, Any]:
    """The current weather in a city."""
    return {"city": city, "temperature": 21 if unit == "celsius" else 70, "unit": unit, "sky": "clear"}


def find_hotels(city: City, max_price: Annotated[int, Field(ge=20, le=500)]) -> list[dict[str, Any]]:
    """Hotels in a city under a nightly price."""
    return [{"name": "Harbour View", "price": min(max_price, 120)}, {"name": "Old Town Inn", "price": 85}]


TOOLS = [get_weather, find_hotels]
FUNCTIONS = {fn.__name__: fn for fn in TOOLS}
SYSTEM = {"role": "system", "content": "You are a travel assistant. Use the tools to answer; be brief."}


def show(turn: int, what: str, out: Completion) -> None:
    print(f"turn {turn}: {what}")
    print(f"  finish_reason={out.finish_reason} prompt_tokens={out.usage.prompt_tokens} "
          f"cached_tokens={out.usage.cached_tokens}")


async def main(model_dir: str | Path) -> None:
    async with AsyncEngine.from_pretrained(model_dir) as engine:
        # Requests that pass the same tools and start with these messages reuse this KV.
        system = await engine.cache_prefix(messages=[SYSTEM], tools=TOOLS)
        print(f"system prompt + tools: {system.num_tokens} tokens, {system.num_cached_tokens} pinned")
        convo: list[dict[str, Any]] = [{"role": "user", "content": "What's the weather in Lisbon right now?"}]

        # Turn 1: the model must call a tool (tool_choice="required"), one call at a time.
        call = await engine.generate(messages=convo, prefix=system, tools=TOOLS, tool_choice="required",
                                     parallel_tool_calls=False, params=SamplingParams(temperature=0.7, seed=0))
        tool_call = call.tool_calls[0]
        show(1, f"call {tool_call.name}({json.dumps(tool_call.parsed)})", call)

        # Run the function with the parsed arguments and send its result back as a "tool" message.
        result = FUNCTIONS[tool_call.name](**tool_call.parsed)
        print(f"  tool result: {json.dumps(result)}")
        convo += [{"role": "assistant", "content": call.text, "tool_calls": [c.to_openai() for c in call.tool_calls]},
                  {"role": "tool", "tool_call_id": tool_call.id, "content": json.dumps(result)}]

        # Turn 2: the answer from the tool's result (tool_choice="none": text only).
        answer = await engine.generate(messages=convo, prefix=system, tools=TOOLS, tool_choice="none",
                                       params=SamplingParams(max_tokens=16, seed=1))
        show(2, f"answer {answer.text!r}", answer)

        # Turn 3: a follow-up; the model may call a tool again or answer (tool_choice="auto").
        convo += [{"role": "assistant", "content": answer.text},
                  {"role": "user", "content": "Thanks! Any hotels under 150 there?"}]
        follow_up = await engine.generate(messages=convo, prefix=system, tools=TOOLS,
                                          params=SamplingParams(max_tokens=16, seed=2))
        calls = ", ".join(f"{c.name}({json.dumps(c.parsed)})" for c in follow_up.tool_calls)
        show(3, f"call {calls}" if calls else f"answer {follow_up.text!r}", follow_up)

        print(f"prefix handle used by {system.hits} requests")
        system.release()  # unpinned: its blocks stay reusable until evicted


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else demo_model_dir()))  # the demo is built once
