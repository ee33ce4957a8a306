"""A LlamaIndex query over a few local documents, answered by kvloom in-process.

Run: python examples/llamaindex_query.py [MODEL_DIR]     (needs: pip install "kvloom[llama-index]")
Without MODEL_DIR it uses the shipped demo model (5M parameters, trained on a synthetic corpus: its
answers are short and often wrong here), and the structured answer still validates, because the
grammar decides what may be written. Nothing
is downloaded: a SummaryIndex needs no embedding model, and the model's own tokenizer sizes the
chunks and the context (LlamaIndex's default tokenizer, tiktoken, would be fetched).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Literal

from llama_index.core import Document, Settings, SummaryIndex
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from pydantic import BaseModel, Field
from transformers import AutoTokenizer

from kvloom.demo import demo_model_dir
from kvloom.integrations.llama_index import KVLoomLLM

DOCUMENTS = [
    "kvloom serves language models inside a Python application, with no server process.",
    "Continuous batching lets new requests join the running batch at every decoding step.",
    "A paged KV cache stores attention keys and values in fixed-size blocks shared by prefixes.",
    "Grammar-constrained decoding makes every output validate against a JSON schema.",
]


class Answer(BaseModel):
    topic: Literal["batching", "kv cache", "grammars", "embedding"]
    summary: str = Field(max_length=40)


async def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else demo_model_dir()  # built once into the cache
    counter = TokenCountingHandler(tokenizer=AutoTokenizer.from_pretrained(model_dir).encode)
    llm = KVLoomLLM(model_path=model_dir, temperature=0.0, max_tokens=48)  # the engine starts at the first call
    Settings.llm, Settings.tokenizer = llm, counter.tokenizer
    Settings.callback_manager = CallbackManager([counter])
    try:
        index = SummaryIndex.from_documents([Document(text=text) for text in DOCUMENTS])
        question = "What does a paged KV cache do?"
        response = await index.as_query_engine(response_mode="compact").aquery(question)
        print("documents:", len(DOCUMENTS))
        print("question: ", question)
        print("answer:   ", str(response).strip().replace("\n", " "))
        print("sources:  ", len(response.source_nodes))
        structured = index.as_query_engine(response_mode="compact", output_cls=Answer, llm=llm)
        answer = (await structured.aquery(question)).response
        print("structured:", Answer.model_validate(answer).model_dump_json())
        print("tokens:   ", counter.prompt_llm_token_count, "prompt,", counter.completion_llm_token_count,
              "completion, counted by the engine")
    finally:
        llm.close()


if __name__ == "__main__":
    asyncio.run(main())
