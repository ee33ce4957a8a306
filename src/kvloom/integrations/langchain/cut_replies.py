"""Structured replies cut by ``max_tokens``: recognised before parsing, refused with an error saying so.

LangChain's parsers read a cut reply as something else: ``JsonOutputParser`` accepts partial
JSON (a dict with a truncated string, or missing keys), the tools parsers skip a call whose
arguments do not parse and return ``None``, and a pydantic schema fails with a validation
error about a missing field. ``RefuseCut`` wraps such a parser: a reply that ended with
``finish_reason="length"`` before its JSON or its call's arguments closed raises
``OutputParserException`` saying it was cut by ``max_tokens``; any other reply is the wrapped
parser's. It stays a cumulative parser, so ``stream()`` still yields partial objects, then
raises at the last chunk (the one that carries ``finish_reason``) if the reply was cut.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import BaseMessage
from langchain_core.output_parsers.transform import BaseCumulativeTransformOutputParser
from langchain_core.outputs import ChatGeneration, Generation


def was_cut(message: BaseMessage, tool_name: str | None) -> bool:
    """Whether ``message`` ended at ``max_tokens`` before its answer closed: its JSON (``tool_name``
    None) does not parse, or the call of ``tool_name`` is missing or listed as incomplete. An
    answer that closed exactly at ``max_tokens`` is not cut."""
    meta = message.response_metadata
    if meta.get("finish_reason") != "length":
        return False
    if tool_name is None:
        try:
            json.loads(message.text)
        except ValueError:
            return True
        return False
    if meta.get("incomplete_tool_calls"):
        return True
    return not any(call["name"] == tool_name for call in getattr(message, "tool_calls", []))


def cut_error(message: BaseMessage, what: str) -> OutputParserException:
    """The error for a cut ``message``; ``what`` names the answer (``"the Person JSON"``)."""
    usage = getattr(message, "usage_metadata", None)
    after = f" after {usage['output_tokens']} tokens" if usage else ""
    return OutputParserException(
        f"{what} was cut by max_tokens (finish_reason='length'){after}, before it closed; raise max_tokens",
        llm_output=message.text)


class RefuseCut(BaseCumulativeTransformOutputParser[Any]):
    """``parser``, refusing replies cut by ``max_tokens`` (see the module doc).

    ``tool_name``: the call the reply must hold (``function_calling``); None: the reply is JSON.
    ``what`` names the answer in the error.
    """

    parser: BaseCumulativeTransformOutputParser[Any]
    tool_name: str | None = None
    what: str

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        generation = result[0]
        if isinstance(generation, ChatGeneration) and was_cut(generation.message, self.tool_name):
            raise cut_error(generation.message, self.what)
        return self.parser.parse_result(result, partial=partial)

    def parse(self, text: str) -> Any:
        return self.parser.parse(text)

    @property
    def OutputType(self) -> Any:
        return self.parser.OutputType

    @property
    def _type(self) -> str:
        return "kvloom_refuse_cut"
