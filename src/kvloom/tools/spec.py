"""Tools in: the OpenAI Chat Completions shape, from dicts, pydantic models or typed functions.

``normalize_tools`` turns whatever the caller passes into ``ToolSpec``s (name, description,
JSON-schema parameters) and ``normalize_tool_choice`` checks ``tool_choice`` against them.
Every error is an ``InvalidRequestError`` whose message starts with the field at fault
(``tools[2].function.name: ...``), raised before anything is queued.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel

from kvloom.errors import InvalidRequestError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""OpenAI's rule for function names."""

ToolChoiceMode = Literal["auto", "none", "required"]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One function tool. ``parameters_json`` is the JSON schema as text (immutable, hashable)."""

    name: str
    description: str
    parameters_json: str

    @property
    def parameters(self) -> dict[str, Any]:
        """A fresh copy of the JSON schema of the arguments."""
        schema: dict[str, Any] = json.loads(self.parameters_json)
        return schema

    def to_openai(self) -> dict[str, Any]:
        """``{"type": "function", "function": {"name", "description", "parameters"}}``."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True, slots=True)
class NamedToolChoice:
    """``tool_choice={"type": "function", "function": {"name": ...}}``: call exactly this tool."""

    name: str


ToolChoice = ToolChoiceMode | NamedToolChoice


def normalize_tools(tools: Sequence[Any]) -> tuple[ToolSpec, ...]:
    """``tools`` as ``ToolSpec``s. Each item is an OpenAI tool dict (or its bare ``function``
    part), a pydantic model class, or a typed Python function."""
    if isinstance(tools, str | bytes | dict) or not isinstance(tools, Sequence):
        raise InvalidRequestError("tools: must be a list of tools")
    specs = tuple(_one_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools))
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise InvalidRequestError(f"tools[{i}].function.name: {spec.name!r} is given twice")
        seen.add(spec.name)
    return specs


def normalize_tool_choice(choice: Any, tools: Sequence[ToolSpec]) -> ToolChoice:
    """``"auto"`` (the default with tools), ``"none"``, ``"required"`` or a named function,
    which must be one of ``tools``."""
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return choice  # type: ignore[no-any-return]
    name: Any = None
    if isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") == "function" and isinstance(function, dict):
            name = function.get("name")
        elif set(choice) == {"name"}:
            name = choice["name"]
    if not isinstance(name, str):
        raise InvalidRequestError(
            "tool_choice: must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}, "
            f"got {choice!r}")
    known = [t.name for t in tools]
    if name not in known:
        raise InvalidRequestError(f"tool_choice: no tool named {name!r} (tools: {', '.join(known) or 'none'})")
    return NamedToolChoice(name)


def _one_tool(tool: Any, where: str) -> ToolSpec:
    if isinstance(tool, dict):
        if tool.get("type", "function") != "function":
            raise InvalidRequestError(f"{where}.type: only 'function' tools are supported, got {tool.get('type')!r}")
        function = tool.get("function", tool)
        if not isinstance(function, dict):
            raise InvalidRequestError(f"{where}.function: must be an object with a name and parameters")
        return _from_parts(function.get("name"), function.get("description") or "",
                           function.get("parameters", {"type": "object", "properties": {}}), f"{where}.function")
    if isinstance(tool, type) and issubclass(tool, BaseModel):
        return _from_parts(tool.__name__, inspect.getdoc(tool) or "", tool.model_json_schema(), f"{where}.function")
    if callable(tool):
        return _from_function(tool, where)
    raise InvalidRequestError(
        f"{where}: expected an OpenAI tool dict, a pydantic model class or a typed function, got {type(tool).__name__}")


def _from_parts(name: Any, description: Any, parameters: Any, where: str) -> ToolSpec:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequestError(f"{where}.name: must be 1-64 letters, digits, '_' or '-', got {name!r}")
    if not isinstance(description, str):
        raise InvalidRequestError(f"{where}.description: must be a string")
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise InvalidRequestError(f"{where}.parameters: must be a JSON schema of type 'object'")
    try:
        text = json.dumps(parameters)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{where}.parameters: not JSON-serializable ({exc})") from exc
    _check_schema_compiles(text, f"{where}.parameters")
    return ToolSpec(name, description, text)


def _check_schema_compiles(schema_json: str, where: str) -> None:
    """A schema the grammar backend cannot compile fails here, at submit."""
    import xgrammar

    try:
        xgrammar.Grammar.from_json_schema(schema_json)
    except Exception as exc:  # xgrammar raises RuntimeError / ValueError with a reason
        raise InvalidRequestError(f"{where}: the schema does not compile ({exc})") from exc


def _from_function(fn: Callable[..., Any], where: str) -> ToolSpec:
    """A typed function: its name, its docstring's first paragraph, its parameters' schema."""
    from pydantic import create_model

    try:
        hints = get_type_hints(fn, include_extras=True)  # keeps Annotated[..., Field(...)] bounds
    except Exception as exc:
        raise InvalidRequestError(f"{where}: cannot read {getattr(fn, '__name__', fn)!r}'s annotations ({exc})") from exc
    fields: dict[str, Any] = {}
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name not in hints:
            raise InvalidRequestError(f"{where}: parameter {param.name!r} of {fn.__name__!r} has no type annotation")
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (hints[param.name], default)
    model = create_model(fn.__name__, **fields)
    schema = model.model_json_schema()
    schema.pop("title", None)
    doc = (inspect.getdoc(fn) or "").split("\n\n")[0].strip()
    return _from_parts(fn.__name__, doc, schema, f"{where}.function")
