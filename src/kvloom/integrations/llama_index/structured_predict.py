"""Structured prediction through grammar constraints.

LlamaIndex's own route for a function-calling LLM asks for a tool call and hopes the model
makes one; here the chat request carries ``response_format=<the output class>``, so the JSON
the model writes always has the class's shape (the schema constrains decoding; it is not added
to the prompt: describe fields there if the model needs to know what they mean). The
``as_structured_llm`` wrapper and LlamaIndex's programs call these methods, so they take this
route too. Instrumentation events and spans are LlamaIndex's own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Generator
from typing import Any, cast

from llama_index.core.base.llms.types import ChatMessage, ChatResponse
from llama_index.core.instrumentation.events.llm import (
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictInProgressEvent,
    LLMStructuredPredictStartEvent,
)
from llama_index.core.llms.llm import LLM
from llama_index.core.program.utils import process_streaming_objects
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.types import Model
from llama_index_instrumentation import get_dispatcher
from pydantic import BaseModel

dispatcher = get_dispatcher(__name__)


def parse_output(output_cls: type[Model], response: ChatResponse) -> Model:
    """Validate a finished constrained response into ``output_cls``.

    A response cut at ``max_tokens`` before its JSON closed (or aborted) holds only a prefix of
    the JSON: that raises ``ValueError`` saying so instead of a confusing JSON error. One whose
    JSON closed exactly at ``max_tokens`` is validated as any other."""
    raw = response.raw if isinstance(response.raw, dict) else {}
    reason = raw.get("finish_reason")
    text = response.message.content or ""
    if reason == "length" and not _closed(text):
        used = (raw.get("usage") or {}).get("completion_tokens", "?")
        raise ValueError(f"the {output_cls.__name__} JSON was cut by max_tokens (finish_reason='length') after "
                         f"{used} tokens, before it closed; raise max_tokens")
    if reason not in ("stop", "length", None):
        raise ValueError(f"structured output: the request ended with finish_reason={reason!r} before the "
                         f"{output_cls.__name__} JSON closed")
    return output_cls.model_validate_json(text)


def _closed(text: str) -> bool:
    """Whether ``text`` is whole JSON."""
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class PartialOutputs:
    """Streamed constrained responses -> objects: partial ones (LlamaIndex's flexible model,
    filled as far as the JSON so far goes) while the text streams, then, on the last response
    (the one with a ``finish_reason``), the validated ``output_cls`` instance."""

    def __init__(self, output_cls: type[BaseModel]) -> None:
        self.output_cls = output_cls
        self._current: list[Any] | None = None

    def add(self, response: ChatResponse) -> Any:
        raw = response.raw if isinstance(response.raw, dict) else {}
        if raw.get("finish_reason") is not None:
            return parse_output(self.output_cls, response)
        obj = process_streaming_objects(response, self.output_cls, cur_objects=self._current, flexible_mode=True)
        self._current = cast(list[Any], obj) if isinstance(obj, list) else [obj]
        return obj


class StructuredPredictMixin(LLM):
    """``structured_predict`` and its async and streaming forms as constrained chat calls."""

    def _structured_chat(self, output_cls: type[BaseModel], prompt: BasePromptTemplate,
                         llm_kwargs: dict[str, Any] | None,
                         prompt_args: dict[str, Any]) -> tuple[list[ChatMessage], dict[str, Any]]:
        dispatcher.event(LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt,
                                                        template_args=prompt_args))
        messages = self._extend_messages(prompt.format_messages(llm=self, **prompt_args))
        return messages, {**(llm_kwargs or {}), "response_format": output_cls}

    @dispatcher.span
    def structured_predict(self, output_cls: type[Model], prompt: BasePromptTemplate,
                           llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any) -> Model:
        """One ``output_cls`` instance; the JSON is constrained to its schema, then validated."""
        messages, kwargs = self._structured_chat(output_cls, prompt, llm_kwargs, prompt_args)
        result = parse_output(output_cls, self.chat(messages, **kwargs))
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    @dispatcher.span
    async def astructured_predict(self, output_cls: type[Model], prompt: BasePromptTemplate,
                                  llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any) -> Model:
        """``structured_predict`` on the caller's event loop (it never blocks it)."""
        messages, kwargs = self._structured_chat(output_cls, prompt, llm_kwargs, prompt_args)
        result = parse_output(output_cls, await self.achat(messages, **kwargs))
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    @dispatcher.span
    def stream_structured_predict(self, output_cls: type[Model], prompt: BasePromptTemplate,
                                  llm_kwargs: dict[str, Any] | None = None,
                                  **prompt_args: Any) -> Generator[Any, None, None]:
        """Partial objects as the JSON streams in; the last one is the validated ``output_cls``."""
        messages, kwargs = self._structured_chat(output_cls, prompt, llm_kwargs, prompt_args)
        partials, result = PartialOutputs(output_cls), None
        for response in self.stream_chat(messages, **kwargs):
            result = partials.add(response)
            dispatcher.event(LLMStructuredPredictInProgressEvent(output=result))
            yield result
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))

    @dispatcher.span
    async def astream_structured_predict(self, output_cls: type[Model], prompt: BasePromptTemplate,
                                         llm_kwargs: dict[str, Any] | None = None,
                                         **prompt_args: Any) -> AsyncGenerator[Any, None]:
        """``stream_structured_predict`` as an async generator (returned by the awaited call)."""
        messages, kwargs = self._structured_chat(output_cls, prompt, llm_kwargs, prompt_args)
        responses = await self.astream_chat(messages, **kwargs)

        async def gen() -> AsyncGenerator[Any, None]:
            partials, result = PartialOutputs(output_cls), None
            async for response in responses:
                result = partials.add(response)
                dispatcher.event(LLMStructuredPredictInProgressEvent(output=result))
                yield result
            dispatcher.event(LLMStructuredPredictEndEvent(output=result))

        return gen()
