"""Public request parameters. Pydantic at the boundary: bad input fails before queueing,
with a message that names the field."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvloom.structured.logits_processor import LogitsProcessorFactory
from kvloom.structured.spec import ResponseFormat

GrammarBackendName = Literal["xgrammar", "outlines"]

MAX_LOGPROBS = 20


class SamplingParams(BaseModel):
    """How to sample one request. Unknown fields are rejected. Immutable, sequences included
    (``stop``, ``stop_token_ids`` and ``logits_processors`` are tuples; lists are accepted):
    the engine thread reads them while the caller goes on.

    Defaults follow vLLM, except ``max_tokens`` (256 instead of 16: an embedded engine's
    users call ``generate`` expecting an answer, not a fragment).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, arbitrary_types_allowed=True)

    max_tokens: int = Field(256, ge=1, description="Most tokens to generate per choice.")
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, lt=2**31, description="0 or -1: off.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, lt=2**63, description="Same seed, same tokens, whatever the batch.")
    stop: tuple[str, ...] = Field((), description="Stop strings (not included in the output).")
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, description="EOS and stop tokens are masked until this many are generated.")
    n: int = Field(1, ge=1, le=128, description="Number of choices; choice i uses seed + i when seeded.")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Top-N logprobs per sampled token.")
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = Field(
        None,
        description="Constrain the output: a pydantic model class, a JSON schema dict, "
        "{'type': 'json_object' | 'regex' | 'choice' | 'grammar', ...} or a ResponseFormat.",
    )
    grammar_backend: GrammarBackendName | None = Field(
        None, description="Compile response_format with this backend (default: the engine's grammar_backend)."
    )
    logits_processors: tuple[LogitsProcessorFactory, ...] = Field(
        (),
        description="Zero-argument factories; each sequence gets fresh processors (see kvloom.structured.logits_processor).",
    )

    @field_validator("response_format", mode="before")
    @classmethod
    def _coerce_format(cls, value: Any) -> Any:
        return None if value is None else ResponseFormat.coerce(value)

    @field_validator("logits_processors", mode="before")
    @classmethod
    def _factories_callable(cls, value: Any) -> Any:
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            raise ValueError("must be a list of zero-argument callables returning a LogitsProcessor")
        for i, factory in enumerate(value):
            if not callable(factory):
                raise ValueError(f"item {i} ({type(factory).__name__}) is not callable: pass a class or a factory")
        return tuple(value)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        return value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _ids_non_negative(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(t < 0 for t in value):
            raise ValueError("token ids must be >= 0")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k_off(cls, value: int) -> int:
        return 0 if value == -1 else value

    @model_validator(mode="after")
    def _min_le_max(self) -> Self:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        return self

    def for_choice(self, index: int) -> SamplingParams:
        """Params of choice ``index`` of an ``n > 1`` request: ``n = 1`` and ``seed + index``."""
        seed = None if self.seed is None else (self.seed + index) % 2**63
        return self.model_copy(update={"n": 1, "seed": seed})
