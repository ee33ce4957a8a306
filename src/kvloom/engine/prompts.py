"""Turn a user's prompt (text, token ids or chat messages) into validated prompt token ids."""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from typing import Any

from kvloom.errors import InvalidRequestError
from kvloom.params import SamplingParams
from kvloom.tools.formats import ToolCallFormat
from kvloom.tools.request import ToolRequest

Prompt = str | Sequence[int]
Message = dict[str, Any]


try:
    from jinja2 import TemplateError as _TemplateError
except ImportError:  # pragma: no cover - transformers renders chat templates with jinja2
    _TemplateError = ValueError  # type: ignore[assignment,misc]

INLINE_CHARS = 8192
"""Prompts (or chat messages) up to this many characters are tokenized on the caller's thread;
longer ones in a worker thread, so the event loop never stalls on a long document."""


def check_messages(messages: object) -> None:
    """Chat messages are a non-empty list of dicts, each with a string ``role`` and a string,
    list or absent ``content`` (else the template fails obscurely, or renders garbage)."""
    if not isinstance(messages, list | tuple) or not messages:
        raise InvalidRequestError(f"messages: expected a non-empty list of message dicts, got {messages!r:.60}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{i}]: expected a dict, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{i}].role: expected a non-empty string, got {role!r:.60}")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequestError(
                f"messages[{i}].content: expected a string, a list of parts or None, got {type(content).__name__}")


class PromptEncoder:
    """Tokenizes and validates requests before anything is queued. Frontend-side, stateless
    apart from its tokenizer, which only one thread may use: ``clone()`` gives another thread
    its own (HF fast tokenizers raise "Already borrowed" when two threads share one).

    ``max_prefill_tokens``: with chunked prefill off, the most prompt tokens one step can
    take (``max_num_batched_tokens``); None when prompts may be prefilled in chunks.
    """

    def __init__(
        self, tokenizer: Any | None, vocab_size: int, max_model_len: int, max_tokens_in_pool: int,
        max_prefill_tokens: int | None = None, tool_call_format: ToolCallFormat | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.tool_call_format = tool_call_format
        """The checkpoint's tool-call syntax (None: unknown, requests with tools are refused)."""
        self._template_renders_tools: bool | None = None
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_tokens_in_pool = max_tokens_in_pool
        self.max_prefill_tokens = max_prefill_tokens

    def clone(self) -> PromptEncoder:
        """The same encoder with its own copy of the tokenizer (for another thread)."""
        return PromptEncoder(copy.deepcopy(self.tokenizer), self.vocab_size, self.max_model_len,
                             self.max_tokens_in_pool, self.max_prefill_tokens, self.tool_call_format)

    @staticmethod
    def is_long(prompt: Prompt | None, messages: Sequence[Message] | None) -> bool:
        """Whether tokenizing this is worth a worker thread (see ``INLINE_CHARS``)."""
        if isinstance(prompt, str):
            return len(prompt) > INLINE_CHARS
        if isinstance(messages, list | tuple):
            return sum(len(str(m.get("content") or "")) for m in messages if isinstance(m, dict)) > INLINE_CHARS
        return False

    def to_token_ids(
        self, prompt: Prompt | None, messages: Sequence[Message] | None, add_generation_prompt: bool = True,
        tools: ToolRequest | None = None,
    ) -> list[int]:
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("give exactly one of `prompt` or `messages`")
        if messages is not None:
            check_messages(messages)
            tok = self._need_tokenizer("messages")
            if getattr(tok, "chat_template", None) is None:
                raise InvalidRequestError("messages: the tokenizer has no chat template; pass a `prompt` instead")
            kwargs: dict[str, Any] = {}
            if tools is not None:
                if self.template_renders_tools():
                    kwargs["tools"] = tools.openai_tools()
                else:  # documented fallback: describe the tools in a system message
                    messages = [tools.fallback_system_message(), *messages]
            try:
                ids = tok.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                              tokenize=True, **kwargs)
            except (TypeError, ValueError, KeyError, AttributeError, UnicodeError, _TemplateError) as e:
                raise InvalidRequestError(f"messages: the chat template cannot render them ({e})") from e
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt: must not be empty")
            tok = self._need_tokenizer("prompt")
            try:
                return [int(t) for t in tok.encode(prompt)]
            except (TypeError, ValueError, UnicodeError) as e:
                raise InvalidRequestError(f"prompt: cannot be tokenized ({e})") from e
        if prompt is None or isinstance(prompt, bytes | bytearray | dict) or not hasattr(prompt, "__iter__"):
            raise InvalidRequestError(f"prompt: expected a string or a sequence of token ids, got {type(prompt).__name__}")
        try:
            ids = [operator.index(t) for t in prompt]
        except TypeError as e:
            raise InvalidRequestError(f"prompt: token ids must be integers ({e})") from None
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return ids

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt: must not be empty")
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"max_tokens: prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds max_model_len ({self.max_model_len})"
            )
        if total > self.max_tokens_in_pool:
            raise InvalidRequestError(
                f"max_tokens: prompt + max_tokens = {total} tokens cannot fit in the KV cache "
                f"({self.max_tokens_in_pool} tokens) even alone; raise kv_cache_memory or num_kv_blocks"
            )
        if self.max_prefill_tokens is not None and len(token_ids) > self.max_prefill_tokens:
            raise InvalidRequestError(
                f"prompt: {len(token_ids)} tokens exceed max_num_batched_tokens={self.max_prefill_tokens}, and with "
                "enable_chunked_prefill=False a prompt must be prefilled in one step; raise max_num_batched_tokens "
                "or set enable_chunked_prefill=True"
            )

    def template_renders_tools(self) -> bool:
        """Whether the chat template writes the ``tools`` it is given (probed once)."""
        if self._template_renders_tools is None:
            probe = {"type": "function", "function": {"name": "kvloom_probe_tool", "description": "",
                                                      "parameters": {"type": "object", "properties": {}}}}
            text = self._need_tokenizer("messages").apply_chat_template(
                [{"role": "user", "content": "hi"}], tools=[probe], add_generation_prompt=True, tokenize=False)
            self._template_renders_tools = "kvloom_probe_tool" in str(text)
        return self._template_renders_tools

    def _need_tokenizer(self, field: str) -> Any:
        if self.tokenizer is None:
            raise InvalidRequestError(f"{field}: this checkpoint has no tokenizer; pass token ids")
        return self.tokenizer
