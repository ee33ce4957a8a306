"""A tool-calling agent loop with LangChain on kvloom: bind tools, run the call the model makes,
send the result back as a ``ToolMessage``, get the final answer.

Run: python examples/langchain_agent.py [MODEL_DIR]
Without MODEL_DIR it uses the shipped demo model (5M parameters, trained on a synthetic corpus;
its final words are simple and sometimes wrong), and the call is always well-formed: the grammar
makes every call name a bound tool with arguments valid against its schema. Needs
``kvloom[langchain]``.
"""

from __future__ import annotations

import sys
from typing import Literal

from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool

from kvloom.demo import demo_model_dir
from kvloom.integrations.langchain import ChatKVLoom

FORECASTS = {"Paris": "light rain, 14 C", "Tokyo": "sunny, 22 C", "Lima": "overcast, 18 C"}


@tool
def get_weather(city: Literal["Paris", "Tokyo", "Lima"], days: int = 1) -> str:
    """Get the weather forecast for a city over the next few days."""
    return f"{city}: {FORECASTS[city]} for the next {days} day(s)"


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else demo_model_dir()  # built once into the cache
    chat = ChatKVLoom(model_path=model_dir, temperature=0.7, seed=0, max_tokens=64)
    messages: list[BaseMessage] = [
        SystemMessage("You are a travel assistant. Use the tools to answer."),
        HumanMessage("What is the weather in Paris this weekend?"),
    ]
    try:
        # First turn: a tool call is required (tool_choice="any"), one at a time.
        ai = chat.bind_tools([get_weather], tool_choice="any", parallel_tool_calls=False).invoke(messages)
        messages.append(ai)
        for call in ai.tool_calls:
            print(f"tool call: {call['name']}({call['args']}) id={call['id']}")
            result = get_weather.invoke(call)  # a ToolMessage answering that call id
            assert isinstance(result, ToolMessage)
            print(f"tool result: {result.content}")
            messages.append(result)
        # Second turn: the model sees its call and the result (as its chat template renders them).
        final = chat.bind_tools([get_weather], tool_choice="none").invoke(messages, max_tokens=24)
        print(f"final answer: {final.content!r}")
        usage = final.usage_metadata or {}
        print(f"final turn: {usage.get('input_tokens')} prompt tokens, "
              f"{usage.get('input_token_details', {}).get('cache_read')} read from the cache")
    finally:
        chat.close()


if __name__ == "__main__":
    main()
