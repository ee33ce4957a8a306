"""A request's tools: checked at submit, rendered through the chat template, constrained,
and parsed back into tool calls when the request finishes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvloom.errors import InvalidRequestError
from kvloom.structured.spec import GrammarSpec
from kvloom.tools.formats import ToolCallFormat, structural_tag
from kvloom.tools.spec import ToolChoice, ToolSpec, normalize_tool_choice, normalize_tools
from kvloom.tools.stream_parser import ToolCallStreamParser

FALLBACK_SYSTEM_PROMPT = (
    "You can call these functions. To call one, answer with {call_format}, and nothing else.\n"
    "Functions (JSON schema):\n{tools}"
)
"""Used when the checkpoint's chat template ignores ``tools`` (it never renders them): the
tools are described in a system message instead of being silently dropped."""

_CALL_FORMATS: dict[ToolCallFormat, str] = {
    "hermes": '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>',
    "llama": '{"name": <function-name>, "parameters": <args-json-object>}',
}


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """What a request with ``tools=`` carries from submit to its completion."""

    tools: tuple[ToolSpec, ...]
    choice: ToolChoice
    parallel: bool
    format: ToolCallFormat

    @classmethod
    def build(
        cls, tools: Sequence[Any], tool_choice: Any, parallel_tool_calls: bool, fmt: ToolCallFormat | None,
        has_messages: bool, has_response_format: bool,
    ) -> ToolRequest:
        """Check everything about the request's tools (raising ``InvalidRequestError`` naming
        the field) before anything is tokenized or queued."""
        if not has_messages:
            raise InvalidRequestError("tools: need chat `messages` (the chat template renders them), not a `prompt`")
        if has_response_format:
            raise InvalidRequestError("tools: cannot be combined with `response_format` in one request")
        specs = normalize_tools(tools)
        if not specs:
            raise InvalidRequestError("tools: must not be empty (omit it instead)")
        choice = normalize_tool_choice(tool_choice, specs)
        if fmt is None:
            raise InvalidRequestError(
                "tools: this checkpoint's tool-call syntax is unknown (its config and chat template name no known "
                "family); set the engine's tool_call_format to 'hermes' or 'llama'")
        return cls(specs, choice, bool(parallel_tool_calls), fmt)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tools]

    def openai_tools(self) -> list[dict[str, Any]]:
        return [t.to_openai() for t in self.tools]

    def fallback_system_message(self) -> dict[str, str]:
        tools = "\n".join(json.dumps(t) for t in self.openai_tools())
        return {"role": "system",
                "content": FALLBACK_SYSTEM_PROMPT.format(call_format=_CALL_FORMATS[self.format], tools=tools)}

    def grammar_spec(self) -> GrammarSpec | None:
        """The constraint: None for ``tool_choice="none"`` (text only)."""
        if self.choice == "none":
            return None
        return GrammarSpec("structural_tag", structural_tag(self.format, self.tools, self.choice, self.parallel))

    def stream_parser(self) -> ToolCallStreamParser | None:
        """A parser for one choice's text (None for ``tool_choice="none"``: text only)."""
        if self.choice == "none":
            return None
        return ToolCallStreamParser(self.format, frozenset(self.names))
