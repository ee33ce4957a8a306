"""Reading tool calls out of text as it streams: content deltas without markup, and call deltas
in the OpenAI shape (index, id and name first, then argument fragments).

The same parser produces the final result, so a stream's deltas always concatenate to exactly
the completion's ``text`` and ``tool_calls``. A call's ``arguments`` is the arguments JSON as
the model wrote it (a constrained call validates as written). A call cut short by
``max_tokens`` keeps what it had (as OpenAI does with ``finish_reason="length"``) and is marked:
when the text ends inside a call's arguments, that call is ``incomplete`` in ``result`` and the
final ``feed`` says so in a delta for it. One cut before its name was complete is dropped (there
is no call to report, and its markup is not text).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

import regex as re

from kvloom.outputs import ToolCall, ToolCallDelta
from kvloom.tools.formats import ToolCallFormat

_TRIGGER: dict[ToolCallFormat, str] = {"hermes": "<tool_call>", "llama": '{"name"'}
# A call's head ends where its arguments object starts (the lookahead), so a head is never
# taken while the whitespace before the arguments may still grow.
_HEAD: dict[ToolCallFormat, re.Pattern[str]] = {
    "hermes": re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*(?=\{)'),
    "llama": re.compile(r'\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"parameters"\s*:\s*(?=\{)'),
}
_TAIL: dict[ToolCallFormat, re.Pattern[str]] = {
    "hermes": re.compile(r"\s*\}\s*</tool_call>"),
    "llama": re.compile(r"\s*\}"),
}


@dataclass(slots=True)
class _Call:
    id: str
    name: str
    arguments: str = ""


@dataclass(slots=True)
class ToolCallStreamParser:
    """One sequence's parser. ``feed`` the text deltas in order; ``final=True`` with the last."""

    format: ToolCallFormat
    tool_names: frozenset[str]
    content: str = ""
    """The text outside calls handed out so far (whitespace between calls is dropped)."""
    calls: list[_Call] = field(default_factory=list)
    _buf: str = ""
    _pos: int = 0
    _state: Literal["text", "args", "tail"] = "text"
    _depth: int = 0
    _in_string: bool = False
    _escape: bool = False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        out_text: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            before = (self._pos, self._state)
            if self._state == "text":
                self._text(out_text, deltas, final)
            elif self._state == "args":
                self._args(deltas)
            else:
                self._tail()
            if (self._pos, self._state) == before:
                break
        if final and self.in_arguments:
            self._mark_cut(deltas)
        emitted = "".join(out_text)
        self.content += emitted
        return emitted, deltas

    @property
    def in_arguments(self) -> bool:
        """Whether the text so far ends inside a call's arguments (they have not closed)."""
        return self._state == "args"

    def result(self) -> tuple[str, list[ToolCall]]:
        """The content and the calls (after the final ``feed``, or wherever an abort stopped
        the text): the last call is ``incomplete`` if the text ended inside its arguments."""
        last = len(self.calls) - 1
        return self.content, [ToolCall(c.id, c.name, c.arguments, incomplete=i == last and self.in_arguments)
                              for i, c in enumerate(self.calls)]

    def _mark_cut(self, deltas: list[ToolCallDelta]) -> None:
        """The final feed ended inside the last call: its last piece here says so (one is added
        when this feed brought it no arguments)."""
        index = len(self.calls) - 1
        if deltas and deltas[-1].index == index and deltas[-1].id is None:
            deltas[-1].incomplete = True
        else:
            deltas.append(ToolCallDelta(index, incomplete=True))

    # ---- states ----------------------------------------------------------------------------
    def _text(self, out: list[str], deltas: list[ToolCallDelta], final: bool) -> None:
        trigger = _TRIGGER[self.format]
        start = self._buf.find(trigger, self._pos)
        if start == -1:
            end = len(self._buf) if final else max(self._pos, len(self._buf) - len(trigger) + 1)
            self._emit_text(out, end, final)
            return
        head = _HEAD[self.format].match(self._buf, start)
        if head is None:
            if not self._could_become_head(start):
                self._emit_text(out, start + 1, final)  # not a call: the trigger's first char is text
            elif final:  # a call cut (max_tokens) before its name was complete: markup, never text
                self._emit_text(out, start, True)
                self._pos = len(self._buf)
            else:
                self._emit_text(out, start, final)
            return
        if head.group(1) not in self.tool_names:
            self._emit_text(out, start + 1, final)
            return
        self._emit_text(out, start, True)
        call = _Call(f"call_{uuid.uuid4().hex[:24]}", head.group(1))
        self.calls.append(call)
        deltas.append(ToolCallDelta(len(self.calls) - 1, call.id, call.name, ""))
        self._pos, self._state = head.end(), "args"
        self._depth, self._in_string, self._escape = 0, False, False

    def _could_become_head(self, start: int) -> bool:
        """Whether the text from ``start`` on is still a prefix of some call head."""
        return _HEAD[self.format].match(self._buf, start, partial=True) is not None

    def _emit_text(self, out: list[str], end: int, flush: bool) -> None:
        """Hand out ``_buf[_pos:end]``; after the first call, whitespace alone is held back
        (it is the separator between calls) until something else follows."""
        piece = self._buf[self._pos:end]
        if self.calls and not piece.strip():
            if flush and end == len(self._buf):
                self._pos = end
            return
        out.append(piece)
        self._pos = end

    def _args(self, deltas: list[ToolCallDelta]) -> None:
        call = self.calls[-1]
        i, end = self._pos, len(self._buf)
        while i < end:
            ch = self._buf[i]
            i += 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    break
        fragment = self._buf[self._pos:i]
        if fragment:
            call.arguments += fragment
            deltas.append(ToolCallDelta(len(self.calls) - 1, arguments=fragment))
        self._pos = i
        if self._depth == 0 and call.arguments.strip():
            self._state = "tail"

    def _tail(self) -> None:
        match = _TAIL[self.format].match(self._buf, self._pos)
        if match is not None:
            self._pos, self._state = match.end(), "text"
