"""What callers get back: completions with their choices, usage and logprobs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort", "error", "tool_calls"]
"""``error``: a logits processor rejected the sampled token or raised (see the engine log);
``tool_calls``: the choice ended with one or more tool calls (see ``Choice.tool_calls``)."""


@dataclass(slots=True, frozen=True)
class ToolCall:
    """One function call the model made (OpenAI's ``tool_calls[i]``)."""

    id: str
    """Unique per call (``call_`` + 24 hex digits)."""
    name: str
    arguments: str
    """The arguments as JSON text; with a constrained request it validates against the tool's schema."""

    @property
    def parsed(self) -> dict[str, Any]:
        """The arguments as a dict."""
        value: dict[str, Any] = json.loads(self.arguments)
        return value

    def to_openai(self) -> dict[str, Any]:
        """``{"id", "type": "function", "function": {"name", "arguments"}}``: an assistant message's entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    """Logprobs at one sampled position, from the raw model distribution."""

    token_id: int
    logprob: float
    rank: int
    """Rank of the sampled token (1 = most likely)."""
    top: tuple[tuple[int, float], ...]
    """The top-N ``(token_id, logprob)`` pairs, most likely first."""


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of a streamed tool call (OpenAI's ``delta.tool_calls[i]``): ``id`` and ``name``
    come once, first; then ``arguments`` fragments that concatenate to the call's arguments."""

    index: int
    """Which call of the choice (0, 1, ... in order)."""
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the cache instead of being computed."""
    time_to_first_token: float | None = None
    """Seconds from arrival to the first token."""
    total_time: float | None = None
    """Seconds from arrival to the end."""


@dataclass(slots=True)
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    """Calls parsed from the output of a request with ``tools``; ``text`` is then what came before them."""


@dataclass(slots=True)
class Completion:
    """One request's result. ``text``/``token_ids``/``finish_reason`` are choice 0's."""

    request_id: str
    prompt_token_ids: list[int]
    choices: list[Choice]
    usage: Usage

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.choices[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.choices[0].logprobs

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.choices[0].tool_calls


@dataclass(slots=True)
class StreamChunk:
    """One piece of a streamed request: what choice ``index`` produced since the last chunk.

    Consecutive deltas that a slow consumer had not yet taken are merged into one chunk.
    ``usage`` is set on the request's last chunk only.
    """

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    tool_calls: list[ToolCallDelta] | None = None
    """Tool-call pieces of a request with ``tools`` (their markup never appears in ``text``)."""
