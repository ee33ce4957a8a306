"""Tool calling: tool specs in (``spec``)."""

from kvloom.tools.spec import NamedToolChoice, ToolChoice, ToolSpec, normalize_tool_choice, normalize_tools

__all__ = ["NamedToolChoice", "ToolChoice", "ToolSpec", "normalize_tool_choice", "normalize_tools"]
