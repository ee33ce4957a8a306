"""``with_structured_output`` for ``ChatKVLoom``: three methods, each enforced by a grammar.

- ``json_schema``: the answer is constrained to the schema (``response_format``);
- ``function_calling``: one call of a tool whose parameters are the schema is forced
  (``tool_choice`` naming it, no parallel calls), and the call's arguments are parsed;
- ``json_mode``: the answer is constrained to some JSON object (``{"type": "json_object"}``),
  parsed with the schema.

Like LangChain's own chat models, the bound call carries ``ls_structured_output_format`` (the
method and the schema) for tracing, and ``include_raw=True`` returns the raw message with the
parsed value or the parsing error instead of raising. A reply cut by ``max_tokens`` before it
closed raises (or, with ``include_raw``, reports) an ``OutputParserException`` saying so, never a
partial object or ``None`` (see ``cut_replies``).
"""

from __future__ import annotations

from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.base import OutputParserLike
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from kvloom.integrations.langchain.cut_replies import RefuseCut

if TYPE_CHECKING:
    from langchain_core.language_models import LanguageModelInput

    from kvloom.integrations.langchain.chat_model import ChatKVLoom

StructuredMethod = Literal["json_schema", "function_calling", "json_mode"]
METHODS = ("json_schema", "function_calling", "json_mode")


def structured_output(
    model: ChatKVLoom, schema: dict[str, Any] | type, method: str, include_raw: bool, kwargs: dict[str, Any],
) -> Runnable[LanguageModelInput, Any]:
    """``model.with_structured_output(schema, method=..., include_raw=...)`` (see the module doc)."""
    if kwargs:
        raise ValueError(f"{', '.join(sorted(kwargs))}: not an argument of with_structured_output")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if schema is None:
        raise ValueError("schema: with_structured_output needs a pydantic model, a TypedDict or a JSON schema")
    is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
    traced = {"kwargs": {"method": method}, "schema": schema}
    llm: Runnable[LanguageModelInput, Any]
    parser: OutputParserLike[Any]
    if method == "function_calling":
        name = convert_to_openai_tool(schema)["function"]["name"]
        llm = model.bind_tools([schema], tool_choice=name, parallel_tool_calls=False,
                               ls_structured_output_format=traced)
        parser = RefuseCut(parser=PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                           else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True),
                           tool_name=name, what=f"the {name} tool call")
    else:
        response_format: dict[str, Any] = (
            {"type": "json_schema", "json_schema": {"schema": convert_to_json_schema(schema)}}
            if method == "json_schema" else {"type": "json_object"}
        )
        llm = model.bind(response_format=response_format, ls_structured_output_format=traced)
        parser = RefuseCut(parser=PydanticOutputParser(pydantic_object=schema) if is_pydantic  # type: ignore[arg-type]
                           else JsonOutputParser(), what=f"the {_title(schema)} JSON")
    if not include_raw:
        return llm | parser
    parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=llm) | parsed.with_fallbacks([unparsed], exception_key="parsing_error")


def _title(schema: dict[str, Any] | type) -> str:
    """What errors call the answer: the class's name, else the JSON schema's title, else "answer"."""
    if isinstance(schema, type):
        return schema.__name__
    return str(schema.get("title") or "answer")
