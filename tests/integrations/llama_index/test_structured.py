"""Structured prediction on ``KVLoomLLM``: LlamaIndex's ``structured_predict`` family and
``as_structured_llm`` give instances of a nested pydantic class, valid because decoding was
constrained to its schema (the random-weight model never writes such JSON unaided)."""

from __future__ import annotations

from typing import Literal

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.prompts import PromptTemplate
from pydantic import BaseModel, Field, ValidationError

from kvloom.integrations.llama_index import KVLoomLLM


class Address(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    street: str = Field(max_length=10)


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    address: Address
    tags: list[Literal["a", "b"]] = Field(max_length=2)


PROMPT = PromptTemplate("Describe {who} as JSON.")


@pytest.mark.asyncio
async def test_structured_predict_sync_and_async_give_the_nested_class(llm: KVLoomLLM) -> None:
    person = llm.structured_predict(Person, PROMPT, llm_kwargs={"max_tokens": 200}, who="a tourist")
    assert isinstance(person, Person) and isinstance(person.address, Address)
    assert await llm.astructured_predict(Person, PROMPT, llm_kwargs={"max_tokens": 200}, who="a tourist") == person
    unconstrained = llm.chat(PROMPT.format_messages(who="a tourist"), max_tokens=60).message.content or ""
    with pytest.raises(ValidationError):  # what the grammar is for
        Person.model_validate_json(unconstrained)


@pytest.mark.asyncio
async def test_streamed_structured_predict_ends_with_the_validated_object(llm: KVLoomLLM) -> None:
    whole = llm.structured_predict(Person, PROMPT, llm_kwargs={"max_tokens": 200}, who="a tourist")
    partials = list(llm.stream_structured_predict(Person, PROMPT, llm_kwargs={"max_tokens": 200}, who="a tourist"))
    assert len(partials) > 2 and partials[-1] == whole and type(partials[-1]) is Person
    assert not isinstance(partials[0], Person)  # a partial (flexible) object while the JSON streams in
    stream = await llm.astream_structured_predict(Person, PROMPT, llm_kwargs={"max_tokens": 200}, who="a tourist")
    apartials = [p async for p in stream]
    assert len(apartials) > 2 and apartials[-1] == whole


def test_as_structured_llm_answers_with_the_class_as_json(llm: KVLoomLLM) -> None:
    structured = llm.as_structured_llm(Person)
    response = structured.chat([ChatMessage(role=MessageRole.USER, content="Describe a tourist.")], max_tokens=200)
    assert isinstance(response.raw, Person)
    assert Person.model_validate_json(response.message.content or "") == response.raw


CUT = r"the Person JSON was cut by max_tokens \(finish_reason='length'\) after 5 tokens, before it closed; raise max_tokens"
"""The wording of a cut answer at every door (LangChain's structured output says the same)."""


def test_an_object_cut_at_max_tokens_fails_saying_so(llm: KVLoomLLM) -> None:
    with pytest.raises(ValueError, match=CUT):
        llm.structured_predict(Person, PROMPT, llm_kwargs={"max_tokens": 5}, who="a tourist")
    with pytest.raises(ValueError, match=CUT):
        list(llm.stream_structured_predict(Person, PROMPT, llm_kwargs={"max_tokens": 5}, who="a tourist"))


def test_an_object_that_closed_exactly_at_max_tokens_is_no_cut(llm: KVLoomLLM) -> None:
    """``finish_reason="length"`` alone is no cut: max_tokens ends the reply right after its JSON closed."""
    messages = PROMPT.format_messages(who="a tourist")
    whole = llm.chat(messages, max_tokens=200, response_format=Person)
    closed = whole.raw["usage"]["completion_tokens"] - 1  # the last token is the end of turn
    exact = llm.chat(messages, max_tokens=closed, response_format=Person)
    assert exact.raw["finish_reason"] == "length" and exact.message.content == whole.message.content
    person = llm.structured_predict(Person, PROMPT, llm_kwargs={"max_tokens": closed}, who="a tourist")
    assert person == Person.model_validate_json(whole.message.content or "")
