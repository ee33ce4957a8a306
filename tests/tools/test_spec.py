"""Tools in: every accepted form gives the same OpenAI shape; bad tools fail naming the field."""

from __future__ import annotations

from typing import Annotated, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from kvloom.errors import InvalidRequestError
from kvloom.tools import NamedToolChoice, normalize_tool_choice, normalize_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}


class GetWeather(BaseModel):
    """Current weather in a city."""

    city: str
    unit: Literal["c", "f"] = "c"


def get_weather(city: str, unit: Literal["c", "f"] = "c") -> str:
    """Current weather in a city.

    Longer text that is not part of the description.
    """
    return city


def test_dicts_models_and_functions_give_the_openai_shape() -> None:
    (from_dict, from_model), (from_fn,) = normalize_tools([WEATHER, GetWeather]), normalize_tools([get_weather])
    assert from_dict.to_openai() == WEATHER
    assert (from_model.name, from_model.description) == ("GetWeather", "Current weather in a city.")
    assert (from_fn.name, from_fn.description) == ("get_weather", "Current weather in a city.")
    for spec in (from_model, from_fn):
        schema = spec.parameters
        assert schema["required"] == ["city"] and set(schema["properties"]) == {"city", "unit"}
        jsonschema.validate({"city": "Paris", "unit": "f"}, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"city": "Paris", "unit": "k"}, schema)
    bare = normalize_tools([WEATHER["function"]])[0]
    assert bare == from_dict


@pytest.mark.parametrize(("tools", "field"), [
    ([{"type": "function", "function": {"description": "no name"}}], r"tools\[0\]\.function\.name"),
    ([{"type": "function", "function": {"name": "has space"}}], r"tools\[0\]\.function\.name"),
    ([WEATHER, WEATHER], r"tools\[1\]\.function\.name: 'get_weather' is given twice"),
    ([{"type": "retrieval"}], r"tools\[0\]\.type"),
    ([{"name": "f", "parameters": {"type": "array"}}], r"tools\[0\]\.function\.parameters"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "no-such-type"}}}}],
     r"tools\[0\]\.function\.parameters: the schema does not compile"),
    ([42], r"tools\[0\]: expected"),
    ("get_weather", r"tools: must be a list"),
])
def test_bad_tools_fail_naming_the_field(tools: object, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        normalize_tools(tools)  # type: ignore[arg-type]


def test_an_untyped_function_is_refused() -> None:
    def untyped(city):  # type: ignore[no-untyped-def]
        return city

    with pytest.raises(InvalidRequestError, match="'city' of 'untyped' has no type annotation"):
        normalize_tools([untyped])


def test_tool_choice_forms_and_unknown_names() -> None:
    tools = normalize_tools([WEATHER])
    assert normalize_tool_choice(None, tools) == "auto"
    for mode in ("auto", "none", "required"):
        assert normalize_tool_choice(mode, tools) == mode
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert normalize_tool_choice(named, tools) == NamedToolChoice("get_weather")
    with pytest.raises(InvalidRequestError, match="tool_choice: no tool named 'nope'"):
        normalize_tool_choice({"type": "function", "function": {"name": "nope"}}, tools)
    with pytest.raises(InvalidRequestError, match="tool_choice: must be"):
        normalize_tool_choice("always", tools)


def test_a_functions_annotated_bounds_reach_the_schema() -> None:
    def book(city: Annotated[str, Field(max_length=12)], nights: Annotated[int, Field(ge=1, le=30)]) -> str:
        """Book a hotel."""
        return city

    schema = normalize_tools([book])[0].parameters
    assert schema["properties"]["city"]["maxLength"] == 12
    jsonschema.validate({"city": "Paris", "nights": 3}, schema)
    for bad in ({"city": "Paris" * 3, "nights": 3}, {"city": "Paris", "nights": 31}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
