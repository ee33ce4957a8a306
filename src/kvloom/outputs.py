"""What callers get back: completions with their choices, usage and logprobs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from kvloom.errors import KvloomError

FinishReason = Literal["stop", "length", "abort", "error", "tool_calls"]
"""``error``: a logits processor rejected the sampled token or raised (see the engine log);
``tool_calls``: the choice ended with one or more tool calls (see ``Choice.tool_calls``)."""


@dataclass(slots=True, frozen=True)
class ToolCall:
    """One function call the model made (OpenAI's ``tool_calls[i]``).

    Invariant, for the calls of a completion: ``incomplete`` is False exactly when ``arguments``
    closed (its braces balance), and a constrained call that closed validates against its
    tool's schema. Only the last call of a choice can be incomplete.
    """

    id: str
    """Unique per call (``call_`` + 24 hex digits)."""
    name: str
    arguments: str
    """The arguments as JSON text; with a constrained request it validates against the tool's schema."""
    incomplete: bool = False
    """The output ended inside this call's arguments, nearly always because ``max_tokens`` cut
    it (the completion's ``finish_reason`` is then ``"length"``): ``arguments`` holds what the
    model had written, not valid JSON, and ``parsed`` raises ``IncompleteToolCallError``."""

    @property
    def parsed(self) -> dict[str, Any]:
        """The arguments as a dict. Raises ``IncompleteToolCallError`` (a ``ValueError``) for an
        ``incomplete`` call."""
        if self.incomplete:
            raise IncompleteToolCallError(self)
        value: dict[str, Any] = json.loads(self.arguments)
        return value

    def to_openai(self) -> dict[str, Any]:
        """``{"id", "type": "function", "function": {"name", "arguments"}}``: an assistant message's entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class IncompleteToolCallError(KvloomError, ValueError):
    """A tool call whose arguments were cut before they closed (``ToolCall.incomplete``).

    The message says what cut it and what to do: ``"... cut by max_tokens
    (finish_reason='length') ...; raise max_tokens"``. ``call`` is the cut call.
    """

    def __init__(self, call: ToolCall) -> None:
        self.call = call
        so_far = call.arguments if len(call.arguments) <= 80 else call.arguments[:77] + "..."
        super().__init__(
            f"tool call {call.name!r} ({call.id}) is incomplete: cut by max_tokens (finish_reason='length') before "
            f"its arguments closed; raise max_tokens (a stop string inside the call or an abort cuts it too). "
            f"Arguments so far: {so_far!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.call,)


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
    incomplete: bool = False
    """Set on the request's last chunk for a call the output ended inside (``ToolCall.incomplete``:
    cut by ``max_tokens``, ``finish_reason="length"``); such a piece may carry no arguments."""


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
