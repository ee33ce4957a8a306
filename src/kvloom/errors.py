"""Exceptions raised by kvloom. Every error names the file, key or field at fault."""

from __future__ import annotations


class KvloomError(Exception):
    """Base class of every kvloom error."""


class CheckpointError(KvloomError, ValueError):
    """A checkpoint directory is missing a file, holds a corrupt file, or its weights don't fit its config."""


class UnsupportedModelError(KvloomError, ValueError):
    """The checkpoint's architecture or one of its features is not supported."""


class ConfigError(KvloomError, ValueError):
    """An engine setting is invalid (e.g. the KV budget holds no block)."""


class InvalidRequestError(KvloomError, ValueError):
    """A request is invalid (empty prompt, token id outside the vocabulary, too long, ...)."""


class OutOfBlocksError(KvloomError, RuntimeError):
    """The KV cache pool cannot hold a request even when it runs alone."""


class EngineError(KvloomError, RuntimeError):
    """A step failed inside the engine; ``__cause__`` holds the original exception.

    The requests in flight at that moment fail with it, and the engine marks itself unhealthy.
    """


class EngineDeadError(EngineError):
    """The engine failed earlier (see ``engine.stats().error``) and accepts no more requests."""


class EngineClosedError(KvloomError, RuntimeError):
    """The engine was closed (or never started) while the request was in flight."""


class EngineOverloadedError(KvloomError, RuntimeError):
    """Too many requests are waiting (``max_waiting``): try again later."""


class RequestTimeoutError(KvloomError, TimeoutError):
    """A request passed its deadline (``timeout=`` or the engine's ``request_timeout``, counted
    from submit: queueing and grammar compilation count). It was aborted and its KV blocks
    freed; a stream raises this after the chunks it had already delivered."""


class PrefixBudgetError(KvloomError, RuntimeError):
    """Pinning this prefix would exceed the pin budget (``prefix_pin_fraction`` of the pool)."""


class AdapterError(InvalidRequestError):
    """A LoRA adapter directory cannot be served: a missing or corrupt file, an unsupported PEFT
    feature, or weights that don't fit the base model. The message names the file, field or key."""


class GrammarError(InvalidRequestError):
    """A request's ``response_format`` cannot be used: invalid JSON schema, regex or EBNF grammar,
    a grammar the chosen backend does not support, or an unknown backend. The message starts
    with ``response_format:``."""
