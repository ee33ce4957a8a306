"""``KVLoom``: a LangChain text-completion LLM served by an in-process kvloom engine.

Prompts go to the model as raw text (no chat template: use ``ChatKVLoom`` for chat models).
A batch of prompts is submitted at once and decoded in one continuous batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM, LangSmithParams
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import ConfigDict

from kvloom.engine.async_engine import AsyncEngine
from kvloom.integrations.langchain.settings import EngineRequest, KVLoomSettings
from kvloom.outputs import Completion, StreamChunk


def _generation(completion: Completion) -> Generation:
    usage = completion.usage
    return Generation(text=completion.text, generation_info={
        "finish_reason": completion.finish_reason, "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens, "cached_tokens": usage.cached_tokens,
    })


def _chunk(chunk: StreamChunk, model_name: str) -> GenerationChunk:
    info = None if chunk.finish_reason is None else {"finish_reason": chunk.finish_reason, "model_name": model_name}
    return GenerationChunk(text=chunk.text, generation_info=info)


class KVLoom(KVLoomSettings, BaseLLM):
    """A completion LLM on a kvloom engine (same construction and call arguments as ``ChatKVLoom``)."""

    # BaseChatModel / BaseLLM ignore unknown fields: refuse them instead, naming them.
    model_config = ConfigDict(extra="forbid")

    @property
    def _llm_type(self) -> str:
        return "kvloom"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "model_path": str(self.model_dir), **self.sampling_defaults(None)}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="kvloom", ls_model_name=kwargs.get("model") or self.model or "",
                                 ls_model_type="llm")
        temperature = kwargs.get("temperature", self.temperature)
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if temperature is not None:
            params["ls_temperature"] = temperature
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def _result(self, completions: list[Completion], request: EngineRequest) -> LLMResult:
        usage = {"prompt_tokens": sum(c.usage.prompt_tokens for c in completions),
                 "completion_tokens": sum(c.usage.completion_tokens for c in completions),
                 "cached_tokens": sum(c.usage.cached_tokens for c in completions)}
        return LLMResult(generations=[[_generation(c)] for c in completions],
                         llm_output={"token_usage": usage, "model_name": request.model_name})

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        request = self.build_request(stop, kwargs)
        if len(prompts) == 1:
            return self._result([self.call(_with_prompt(request, prompts[0]))], request)
        return self._result(self.runtime.run(lambda engine: _gather(engine, request, prompts)), request)

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        request = self.build_request(stop, kwargs)
        if len(prompts) == 1:
            return self._result([await self.acall(_with_prompt(request, prompts[0]))], request)
        return self._result(await self.runtime.arun(lambda engine: _gather(engine, request, prompts)), request)

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        request = self.build_request(stop, kwargs)
        for chunk in self.stream_chunks(_with_prompt(request, prompt)):
            generation = _chunk(chunk, request.model_name)
            if run_manager is not None:
                run_manager.on_llm_new_token(generation.text, chunk=generation)
            yield generation

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        request = self.build_request(stop, kwargs)
        async for chunk in self.astream_chunks(_with_prompt(request, prompt)):
            generation = _chunk(chunk, request.model_name)
            if run_manager is not None:
                await run_manager.on_llm_new_token(generation.text, chunk=generation)
            yield generation


def _with_prompt(request: EngineRequest, prompt: str) -> EngineRequest:
    return EngineRequest({**request.kwargs, "prompt": prompt}, request.model_name, request.adapter_from_model)


async def _gather(engine: AsyncEngine, request: EngineRequest, prompts: list[str]) -> list[Completion]:
    """On the engine's loop: every prompt submitted at once (one continuous batch)."""
    return list(await asyncio.gather(*(engine.generate(prompt=p, **request.kwargs) for p in prompts)))
