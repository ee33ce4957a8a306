"""An LCEL chain on kvloom: ``prompt | ChatKVLoom | StrOutputParser``, streamed token by token.

Run: python examples/langchain_chain.py [MODEL_DIR]
Without MODEL_DIR it uses the shipped demo model (5M parameters, trained on a synthetic corpus: it
knows nothing about bicycles, so the words are nonsense; the chain, the chat template, the streaming
and the prefix cache are real). Needs ``kvloom[langchain]``.
"""

from __future__ import annotations

import sys

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from kvloom.demo import demo_model_dir
from kvloom.integrations.langchain import ChatKVLoom

SYSTEM = "You are a concise assistant for a bicycle shop. Answer in one or two sentences. " * 3


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else demo_model_dir()  # built once into the cache
    chat = ChatKVLoom(model_path=model_dir, temperature=0.7, seed=0, max_tokens=32)
    prompt = ChatPromptTemplate.from_messages([("system", SYSTEM), ("human", "{question}")])
    chain = prompt | chat | StrOutputParser()
    try:
        for question in ("How often should I oil my chain?", "Do you sell helmets for children?"):
            print(f"question: {question}")
            print("answer (streamed): ", end="", flush=True)
            num_chunks = 0
            for piece in chain.stream({"question": question}):
                print(piece, end="", flush=True)
                num_chunks += 1
            print(f"\n[{num_chunks} chunks]")
        # The same system prompt again: its KV comes from the prefix cache, not from the model.
        message = (prompt | chat).invoke({"question": "Are you open on Sundays?"})
        usage = message.usage_metadata or {}
        print(f"usage: {usage.get('input_tokens')} prompt tokens, "
              f"{usage.get('input_token_details', {}).get('cache_read')} of them read from the cache")
    finally:
        chat.close()


if __name__ == "__main__":
    main()
