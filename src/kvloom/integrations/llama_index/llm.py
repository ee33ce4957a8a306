"""``KVLoomLLM``: a LlamaIndex ``FunctionCallingLLM`` served by a kvloom engine in-process.

Every method is native: the async ones await ``EngineRuntime.agenerate`` / ``astream`` (the
caller's event loop never waits on the model), the sync ones call ``generate`` / ``stream``.
Chat goes through the checkpoint's own chat template (``messages_to_prompt`` is not used);
``complete`` is a plain text completion of ``completion_to_prompt(prompt)`` (identity by
default; ``formatted=True`` skips it).

Per-call keyword arguments: ``adapter``, ``prefix`` (a ``PrefixHandle``), ``timeout``,
``cache_salt``, ``priority``, ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` go to the
request; anything else is a ``SamplingParams`` field (``temperature``, ``max_tokens``, ``stop``,
``seed``, ``response_format``, ...). A misspelt one fails with pydantic's error naming it, and
so does a misspelt construction argument (``max_token=``): unknown fields are refused, as
LangChain's ``ChatKVLoom`` refuses them; both take the checkpoint as ``model_path=``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.constants import DEFAULT_TEMPERATURE
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from kvloom.config import EngineConfig
from kvloom.engine.async_engine import AsyncEngine
from kvloom.engine.core import resolve_max_model_len
from kvloom.engine.prefix import PrefixHandle
from kvloom.integrations.llama_index.messages import (
    resolve_tool_choice,
    to_openai_messages,
    to_openai_tools,
    tool_selections,
)
from kvloom.integrations.llama_index.responses import (
    ChatStream,
    CompletionStream,
    chat_response,
    completion_response,
)
from kvloom.integrations.llama_index.structured_predict import StructuredPredictMixin
from kvloom.integrations.runtime import EngineRuntime
from kvloom.models.config import load_model_config
from kvloom.params import SamplingParams

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

REQUEST_KEYS = frozenset({"adapter", "prefix", "timeout", "cache_salt", "priority", "tools", "tool_choice",
                          "parallel_tool_calls"})
"""Per-call keyword arguments that go to the request; every other one is a ``SamplingParams`` field."""


class KVLoomLLM(StructuredPredictMixin, FunctionCallingLLM):
    """A LlamaIndex LLM on a kvloom engine: ``KVLoomLLM(model_path=DIR, engine_kwargs={...})``
    (or ``KVLoomLLM(DIR)``) owns an engine that starts on its own thread at the first call
    (construction reads ``config.json`` only, never the weights); ``KVLoomLLM(engine=engine)``
    serves from an engine the caller started (and closes). ``close()`` stops an owned engine.
    Unknown arguments are refused, naming them.
    """

    # LlamaIndex's models ignore unknown fields: refuse them instead, naming them.
    model_config = ConfigDict(extra="forbid")

    model_path: str = Field(description="The checkpoint directory the engine serves.")
    model: str = Field(default="", description="Name in metadata.model_name (default: the directory's name).")
    adapter: str | None = Field(default=None, description="LoRA adapter every call uses unless it names its own "
                                "(adapter=...); None: the base model.")
    temperature: float = Field(default=DEFAULT_TEMPERATURE, ge=0.0, description="0 is greedy.")
    max_tokens: int = Field(default=256, ge=1, description="Most tokens per answer (metadata.num_output).")
    stop: list[str] | None = Field(default=None, description="Stop strings (not included in the output).")
    timeout: float | None = Field(default=None, gt=0.0, description="Seconds each request may take, from submit.")
    additional_kwargs: dict[str, Any] = Field(default_factory=dict,
                                              description="Other SamplingParams fields for every call (top_p, seed, ...).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict,
                                          description="AsyncEngine.from_pretrained settings of an owned engine.")

    _runtime: EngineRuntime = PrivateAttr()
    _max_model_len: int = PrivateAttr()

    def __init__(self, model_path: str | Path | None = None, *, engine: AsyncEngine | None = None,
                 **data: Any) -> None:
        if (model_path is None) == (engine is None):
            raise ValueError("KVLoomLLM: pass model_path= (a checkpoint directory, also taken positionally) or "
                             "engine= (a started AsyncEngine), exactly one of them, not both")
        engine_kwargs = dict(data.get("engine_kwargs") or {})
        if engine is not None:
            if engine_kwargs:
                raise ValueError("engine_kwargs: settings of a shared engine= go to AsyncEngine.from_pretrained")
            config = engine.config
        else:
            config = EngineConfig.from_kwargs(model_path, **engine_kwargs)  # type: ignore[arg-type]
        data.setdefault("model", config.model.name)
        super().__init__(model_path=str(config.model), **data)
        self._request({})  # bad defaults (additional_kwargs, stop, ...) fail here, naming the field
        self._max_model_len = resolve_max_model_len(config, load_model_config(config.model))
        self._runtime = EngineRuntime(engine=engine) if engine is not None else EngineRuntime(model_path, **engine_kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "KVLoomLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self._max_model_len, num_output=self.max_tokens, is_chat_model=True,
                           is_function_calling_model=True, model_name=self.model)

    @property
    def model_dir(self) -> Path:
        """The checkpoint directory served (``model_path`` as a ``Path``, as on LangChain's adapters)."""
        return Path(self.model_path)

    @property
    def runtime(self) -> EngineRuntime:
        """The runtime that routes this LLM's calls (``runtime.engine`` once started)."""
        return self._runtime

    def close(self) -> None:
        """Stop an owned engine and its thread (a shared ``engine=`` is left running). Idempotent."""
        self._runtime.close()

    # ---- requests ------------------------------------------------------------------------
    def convert_chat_messages(self, messages: Sequence[ChatMessage]) -> list[Any]:
        """LlamaIndex messages -> the OpenAI-shaped dicts the engine's chat template renders."""
        return to_openai_messages(messages)

    def _request(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Per-call keyword arguments (over this LLM's defaults) -> ``AsyncEngine.generate`` arguments."""
        request: dict[str, Any] = {"adapter": self.adapter, "timeout": self.timeout}
        sampling: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens,
                                    "stop": self.stop, **self.additional_kwargs}
        for key, value in kwargs.items():
            (request if key in REQUEST_KEYS else sampling)[key] = value
        if sampling.get("n", 1) != 1:
            raise ValueError("n: KVLoomLLM gives one answer per call; leave n at 1")
        request["params"] = SamplingParams.model_validate(sampling)
        return request

    def _chat_request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"messages": self.convert_chat_messages(messages), **self._request(kwargs)}

    def _prompt_request(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
        assert self.completion_to_prompt is not None  # LLM's validator sets the identity default
        text = prompt if formatted else self.completion_to_prompt(prompt)
        return {"prompt": text, **self._request(kwargs)}

    # ---- chat ----------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return chat_response(self._runtime.generate(**self._chat_request(messages, kwargs)), self.model)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return chat_response(await self._runtime.agenerate(**self._chat_request(messages, kwargs)), self.model)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        request = self._chat_request(messages, kwargs)

        def gen() -> ChatResponseGen:
            folded, chunks = ChatStream(self.model), self._runtime.stream(**request)
            try:
                for chunk in chunks:
                    yield folded.add(chunk)
            finally:
                chunks.close()  # type: ignore[attr-defined]  # leaving early aborts the request

        return gen()

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        request = self._chat_request(messages, kwargs)

        async def gen() -> ChatResponseAsyncGen:
            folded, chunks = ChatStream(self.model), self._runtime.astream(**request)
            try:
                async for chunk in chunks:
                    yield folded.add(chunk)
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]

        return gen()

    # ---- completion ----------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return completion_response(self._runtime.generate(**self._prompt_request(prompt, formatted, kwargs)),
                                   self.model)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        completion = await self._runtime.agenerate(**self._prompt_request(prompt, formatted, kwargs))
        return completion_response(completion, self.model)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        request = self._prompt_request(prompt, formatted, kwargs)

        def gen() -> CompletionResponseGen:
            folded, chunks = CompletionStream(self.model), self._runtime.stream(**request)
            try:
                for chunk in chunks:
                    yield folded.add(chunk)
            finally:
                chunks.close()  # type: ignore[attr-defined]

        return gen()

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        request = self._prompt_request(prompt, formatted, kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            folded, chunks = CompletionStream(self.model), self._runtime.astream(**request)
            try:
                async for chunk in chunks:
                    yield folded.add(chunk)
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]

        return gen()

    # ---- tools ---------------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self, tools: Sequence[BaseTool], user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None, verbose: bool = False, allow_parallel_tool_calls: bool = False,
        tool_required: bool = False, tool_choice: str | dict[str, Any] | None = None, **kwargs: Any,
    ) -> dict[str, Any]:
        """``chat`` arguments: the tools as OpenAI dicts, ``tool_required`` as
        ``tool_choice="required"`` (a tool name picks that tool), calls constrained by kvloom."""
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg)
                            if isinstance(user_msg, str) else user_msg)
        request: dict[str, Any] = {"messages": messages, **kwargs}
        if tools:
            request.update(tools=to_openai_tools(tools), tool_choice=resolve_tool_choice(tool_choice, tool_required),
                           parallel_tool_calls=allow_parallel_tool_calls)
        return request

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        return tool_selections(response.message, error_on_no_tool_call)

    # ---- prefix handles ------------------------------------------------------------------
    def cache_prefix(self, messages: Sequence[ChatMessage], *, tools: Sequence[BaseTool] | None = None,
                     **kwargs: Any) -> PrefixHandle:
        """Pin the KV of ``messages`` (a system prompt, maybe with ``tools``) once; pass the
        handle as ``prefix=`` to calls that start with them. ``kwargs``: ``cache_salt``,
        ``adapter`` (default: this LLM's), ``timeout``. Release it with ``release_prefix``."""
        request = self._prefix_request(messages, tools, kwargs)
        return self._runtime.run(lambda engine: engine.cache_prefix(**request))

    async def acache_prefix(self, messages: Sequence[ChatMessage], *, tools: Sequence[BaseTool] | None = None,
                            **kwargs: Any) -> PrefixHandle:
        """``cache_prefix`` from any event loop."""
        request = self._prefix_request(messages, tools, kwargs)
        return await self._runtime.arun(lambda engine: engine.cache_prefix(**request))

    def release_prefix(self, handle: PrefixHandle) -> None:
        """Unpin ``handle`` on the engine's loop (the only place its registry may be touched)."""
        self._runtime.run(lambda engine: _release(handle))

    def _prefix_request(self, messages: Sequence[ChatMessage], tools: Sequence[BaseTool] | None,
                        kwargs: dict[str, Any]) -> dict[str, Any]:
        request = {"messages": self.convert_chat_messages(messages), "adapter": self.adapter, **kwargs}
        if tools:
            request["tools"] = to_openai_tools(tools)
        return request


async def _release(handle: PrefixHandle) -> None:
    handle.release()
