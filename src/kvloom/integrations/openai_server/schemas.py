"""Request bodies of ``/v1/completions`` and ``/v1/chat/completions`` (pydantic).

Fields follow OpenAI's API. Three kinds of extra field are told apart by ``check_fields``:
harmless ones (``user``, ``metadata``, ``store``, ...) are accepted and ignored; known OpenAI
features kvloom does not have (``audio``, ``logit_bias``, ``echo``, ...) and unknown names are
refused with a 400 naming the field, as OpenAI refuses "unrecognized request arguments".
kvloom's own sampling knobs (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``,
``ignore_eos``, ``stop_token_ids``, ``cache_salt``) may come in the body too (the openai
client's ``extra_body``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvloom.integrations.openai_server.errors import bad_request

HARMLESS_FIELDS = frozenset({"metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
"""OpenAI fields that change nothing about the output here: accepted and ignored."""

UNSUPPORTED_FIELDS: dict[str, str] = {
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "functions": "the legacy `functions` field is not supported; use `tools`",
    "function_call": "the legacy `function_call` field is not supported; use `tool_choice`",
    "reasoning_effort": "this model has no reasoning effort setting",
    "verbosity": "this model has no verbosity setting",
}
"""OpenAI fields kvloom cannot honour, with the reason given in the 400."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    """A last chunk with empty ``choices`` and the request's ``usage``."""
    include_obfuscation: bool | None = None
    """Accepted and ignored (there is no obfuscation padding to turn off)."""


class BaseRequest(BaseModel):
    """Fields both endpoints share. ``None`` means "kvloom's default"."""

    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # kvloom's own knobs (``extra_body``):
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    cache_salt: str | None = None

    def check_fields(self) -> None:
        """Refuse (400, naming the field) what is known but unsupported, or unknown."""
        if self.logit_bias:
            raise bad_request("logit_bias", "token biases are not supported")
        for name in self.model_extra or {}:
            if name in HARMLESS_FIELDS:
                continue
            if name in UNSUPPORTED_FIELDS:
                raise bad_request(name, UNSUPPORTED_FIELDS[name])
            raise bad_request(name, "unrecognized request argument")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# ---- chat ------------------------------------------------------------------------------------
class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str
    """The text the API returned: JSON, or any string (a call cut by ``max_tokens`` is not valid
    JSON; OpenAI accepts it back, and so does this app)."""


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    """One message of the conversation; fields OpenAI adds that the template needs not (``refusal``,
    ``annotations``, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def to_template(self, index: int) -> dict[str, Any]:
        """The message as chat templates read it: ``developer`` becomes ``system``, text parts are
        joined, a call's ``arguments`` become what templates expect (see ``template_arguments``)."""
        where = f"messages[{index}]"
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self._text(where)}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            if self.role != "assistant":
                raise bad_request(f"{where}.tool_calls", "only assistant messages carry tool calls")
            message["tool_calls"] = [self._call(call) for call in self.tool_calls]
        return message

    def _text(self, where: str) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for i, part in enumerate(self.content):
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{where}.content[{i}].type",
                                  f"only text content parts are supported, got {kind!r}")
            texts.append(part["text"])
        return "\n".join(texts)

    @staticmethod
    def _call(call: ToolCallIn) -> dict[str, Any]:
        arguments = template_arguments(call.function.arguments)
        return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def template_arguments(text: str) -> Any:
    """A call's ``arguments`` text as the chat template gets it. Never raises: OpenAI accepts
    any string here, so a call cut by ``max_tokens`` can go back in an agent's history.

    - a JSON object or array: the parsed value. Templates such as Qwen2.5's, Hermes 2 Pro's and
      Llama 3.1's always write ``arguments | tojson``, which would quote a string; templates that
      test ``arguments is string`` (Qwen3's, kvloom's tiny ones) write the value as JSON too;
    - blank: ``{}``;
    - anything else (text that is not JSON, e.g. a cut call, or a bare JSON scalar): the text
      itself. ``is string`` templates write it verbatim; ``tojson`` ones write it as one JSON
      string, since a template's ``tojson`` (``json.dumps`` over plain data) cannot write text
      that is not JSON.
    """
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, dict | list) else text


class ChatCompletionRequest(BaseRequest):
    """``POST /v1/chat/completions``. ``max_tokens`` defaults to kvloom's 256."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    modalities: list[str] | None = None

    def check_fields(self) -> None:
        super().check_fields()
        if self.modalities is not None and self.modalities != ["text"]:
            raise bad_request("modalities", "only ['text'] is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs", "needs logprobs: true")

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template(i) for i, m in enumerate(self.messages)]


# ---- completions -----------------------------------------------------------------------------
class CompletionRequest(BaseRequest):
    """``POST /v1/completions``: one prompt (text or token ids) per request; ``max_tokens``
    defaults to 16, as OpenAI's."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def check_fields(self) -> None:
        super().check_fields()
        if self.echo:
            raise bad_request("echo", "echoing the prompt is not supported")
        if self.suffix:
            raise bad_request("suffix", "a suffix (insertion) is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of", f"must equal n ({self.n}): ranking extra samples is not supported")

    def single_prompt(self) -> str | list[int]:
        """The prompt; a list of prompts is accepted when it holds exactly one."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise bad_request("prompt", f"one prompt per request is supported, got {len(prompt)}")
            return prompt[0]  # type: ignore[return-value]
        return prompt  # type: ignore[return-value]
