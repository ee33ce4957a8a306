"""``ChatKVLoom``: a LangChain chat model served by an in-process kvloom engine.

Every call is one engine request with chat ``messages`` (the checkpoint's chat template
renders them, with ``tools`` when bound). The async methods run natively on the engine (no
thread-pool fallback); the sync ones are served by the engine's loop thread, so they work in a
plain script and inside a running loop alike (see ``kvloom.integrations.runtime``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict

from kvloom.integrations.langchain.messages import ChunkConverter, to_chat_messages, to_generation
from kvloom.integrations.langchain.settings import KVLoomSettings
from kvloom.integrations.langchain.structured import StructuredMethod, structured_output

ToolLike = dict[str, Any] | type | Callable[..., Any] | BaseTool


def tool_choice_for_engine(tool_choice: Any) -> Any:
    """LangChain's ``tool_choice`` as kvloom's: ``"any"`` and ``True`` mean ``"required"``;
    another string names a tool; dicts (OpenAI's named form) pass through."""
    if tool_choice is None or tool_choice in ("auto", "none", "required") or isinstance(tool_choice, dict):
        return tool_choice
    if tool_choice == "any" or tool_choice is True:
        return "required"
    if isinstance(tool_choice, str):
        return {"type": "function", "function": {"name": tool_choice}}
    raise ValueError(f"tool_choice: expected 'auto', 'none', 'any', 'required', a tool name or a dict, "
                     f"got {tool_choice!r}")


class ChatKVLoom(KVLoomSettings, BaseChatModel):
    """A chat model on a kvloom engine: ``ChatKVLoom(model_path=DIR)`` owns an engine started
    at the first call; ``ChatKVLoom(engine=engine)`` shares a running one (see ``KVLoomSettings``).

    Per call: ``adapter=`` (a loaded LoRA adapter) or ``model=`` (an adapter's name, or the base
    model's), ``prefix=`` (a ``PrefixHandle`` from ``engine.cache_prefix``), ``cache_salt=``,
    ``priority=``, ``timeout=`` and any ``SamplingParams`` field (``response_format=``, ``seed=``...).
    Repeated prompt prefixes, a system prompt above all, are reused from the KV cache; the
    tokens saved show in ``usage_metadata["input_token_details"]["cache_read"]``.
    """

    # BaseChatModel / BaseLLM ignore unknown fields: refuse them instead, naming them.
    model_config = ConfigDict(extra="forbid")

    @property
    def _llm_type(self) -> str:
        return "kvloom-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "model_path": str(self.model_dir), **self.sampling_defaults(None)}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="kvloom", ls_model_name=kwargs.get("model") or self.model or "",
                                 ls_model_type="chat")
        temperature = kwargs.get("temperature", self.temperature)
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        stop = stop if stop is not None else self.stop
        if temperature is not None:
            params["ls_temperature"] = temperature
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop:
            params["ls_stop"] = stop
        return params

    # ---- calls -------------------------------------------------------------------------------
    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> Any:
        request = self.build_request(stop, kwargs)
        request.kwargs["messages"] = to_chat_messages(messages)
        return request

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        return ChatResult(generations=[to_generation(self.call(request), request.model_name)])

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        return ChatResult(generations=[to_generation(await self.acall(request), request.model_name)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        converter = ChunkConverter(request.model_name)
        for chunk in self.stream_chunks(request):
            generation = converter.convert(chunk)
            if run_manager is not None:
                run_manager.on_llm_new_token(generation.text, chunk=generation)
            yield generation

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        converter = ChunkConverter(request.model_name)
        async for chunk in self.astream_chunks(request):
            generation = converter.convert(chunk)
            if run_manager is not None:
                await run_manager.on_llm_new_token(generation.text, chunk=generation)
            yield generation

    # ---- tools and structured output ------------------------------------------------------------
    def bind_tools(self, tools: Sequence[ToolLike], *, tool_choice: Any = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (OpenAI dicts, pydantic models, TypedDicts, functions, LangChain tools).

        Calls are grammar-constrained by the engine: with ``tool_choice="any"``/``"required"``
        or a tool's name, every call names an allowed tool and its arguments validate against
        its schema; ``"auto"`` (default) lets the model answer in text or call. ``parallel_tool_calls=``
        (default True) may be bound too."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        return super().bind(tools=formatted, tool_choice=tool_choice_for_engine(tool_choice), **kwargs)

    def with_structured_output(
        self, schema: dict[str, Any] | type, *, method: StructuredMethod = "json_schema",
        include_raw: bool = False, strict: bool | None = None, **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Outputs that parse into ``schema`` (pydantic model, TypedDict or JSON schema), always:
        ``json_schema`` constrains the answer to the schema, ``function_calling`` forces one call
        of a tool with it as parameters, ``json_mode`` constrains the answer to any JSON object
        (the prompt should say which). ``strict`` is accepted for compatibility: every method is
        enforced by a grammar. ``include_raw=True`` gives ``{"raw", "parsed", "parsing_error"}``."""
        return structured_output(self, schema, method, include_raw, kwargs)

