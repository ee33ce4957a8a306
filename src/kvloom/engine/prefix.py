"""``PrefixHandle``: a system prompt's or document's KV, computed once and pinned.

The handle holds references on the prefix's whole KV blocks, so eviction cannot touch them
while it lives; requests that start with its tokens (``prefix=handle``, or chat messages that
begin with its messages) reuse them through the prefix cache. ``release()`` (or leaving
``async with``) turns them back into ordinary cached blocks: still reusable until evicted.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvloom.errors import InvalidRequestError

if TYPE_CHECKING:
    from kvloom.engine.prompts import Message, Prompt, PromptEncoder
    from kvloom.tools.request import ToolRequest


@dataclass(eq=False)
class PrefixHandle:
    handle_id: str
    token_ids: tuple[int, ...]
    block_ids: list[int]
    block_size: int
    cache_salt: str | None
    messages: tuple[dict[str, Any], ...] | None
    adapter: str | None = None
    """The LoRA adapter the prefix was computed with (None: the base model)."""
    adapter_hash: str | None = None
    """That adapter's content hash: its KV is only this adapter's, with these weights."""
    hits: int = 0
    """Requests that have used this prefix."""
    released: bool = False
    _release: weakref.WeakMethod[Callable[[PrefixHandle], None]] | None = field(default=None, repr=False)
    """The owner's release callback (weak: a handle never keeps a closed engine alive)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def num_cached_tokens(self) -> int:
        """Tokens a request using this prefix finds in the cache: its whole blocks."""
        return self.num_blocks * self.block_size

    def matches_messages(self, messages: Sequence[dict[str, Any]]) -> bool:
        """Whether a chat request's leading messages are this handle's."""
        n = len(self.messages or ())
        return self.messages is not None and len(messages) > n and tuple(messages[:n]) == self.messages

    def release(self) -> None:
        """Unpin (idempotent). Its blocks stay reusable until evicted."""
        release = self._release() if self._release is not None else None
        if not self.released and release is not None:
            release(self)
        self.released = True

    async def __aenter__(self) -> PrefixHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


def check_prefix_adapter(handle: PrefixHandle, adapter: str | None, adapter_hash: str | None) -> None:
    """A handle's KV belongs to the adapter (weights) it was computed with: any other adapter,
    or the base model, could never reuse it, so such a request is refused rather than silently
    recomputing the whole prefix."""
    if adapter_hash == handle.adapter_hash:
        return
    made_with = f"adapter {handle.adapter!r}" if handle.adapter is not None else "the base model"
    if adapter is not None and adapter == handle.adapter:
        raise InvalidRequestError(
            f"adapter: {adapter!r} was reloaded with other weights after this prefix handle was computed; "
            "its KV no longer applies (cache the prefix again)")
    asked = f"adapter {adapter!r}" if adapter is not None else "the base model"
    raise InvalidRequestError(
        f"adapter: this prefix handle was computed with {made_with}, so a request on {asked} could never reuse it")


def prefix_token_ids(
    handle: PrefixHandle, inputs: PromptEncoder, prompt: Prompt | None, messages: Sequence[Message] | None,
    cache_salt: str | None, tools: ToolRequest | None = None,
) -> tuple[list[int], str | None]:
    """A request's tokens continuing ``handle`` (its prompt's tokens after the handle's, or the
    handle's messages followed by the request's through the chat template), and its salt.
    Reads only the handle's immutable fields: safe on the encoder's worker thread."""
    if cache_salt is not None and cache_salt != handle.cache_salt:
        raise InvalidRequestError("cache_salt: differs from the prefix handle's salt, so it could never hit")
    if messages is not None:
        if handle.messages is None:
            raise InvalidRequestError("prefix: a handle made from a prompt continues with a prompt, not messages")
        return inputs.to_token_ids(None, [*handle.messages, *messages], tools=tools), handle.cache_salt
    own = inputs.to_token_ids(prompt, None) if prompt is not None else []
    return [*handle.token_ids, *own], handle.cache_salt
