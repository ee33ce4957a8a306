"""The demo model's chat template: ChatML turns, tools in the system turn, calls in Hermes ``<tool_call>`` form.

What the model writes is the Hermes / Qwen2.5 form that ``kvloom.tools`` parses::

    <tool_call>
    {"name": "fetch_weather", "arguments": {"city": "Ostra"}}
    </tool_call>

and tool results come back as Qwen does it, in a user turn inside ``<tool_response></tool_response>``.
Where the published template lists each tool as its whole JSON schema, this one lists a tool as one
line, what it does and then the call it takes with each argument's type in place of its value::

    - Get the current weather for a city. Call: {"name": "fetch_weather", "arguments": {"city": string}}

That line is the call with the values left to fill: a model this small learns to copy it far more
readily than to read a JSON schema (it costs a few dozen tokens per tool instead of a hundred). The
description comes first so that the tool's name, read left to right, already follows what the tool is
for (only a description's first paragraph is shown). Optional arguments say ``(optional)``; an ``enum`` lists its values; anything without a ``type``
is ``any``.
"""

from __future__ import annotations

from kvloom.models.chat_templates import HERMES_TURNS

_TOOL_LINE = (
    "{%- set fn = tool['function'] if tool.get('function') else tool %}"
    "{%- set params = fn.get('parameters') or {} %}"
    "{%- set props = params.get('properties') or {} %}"
    "{%- set required = params.get('required') or [] %}"
    "{{- '\n- ' }}"
    "{%- if fn.get('description') %}"
    "{{- (fn['description'].split('\n\n') | first) | replace('\n', ' ') | trim }}{{- ' ' }}{%- endif %}"
    "{{- 'Call: {\"name\": \"' + fn['name'] + '\", \"arguments\": {' }}"
    "{%- for pname, prop in props.items() %}"
    "{%- if not loop.first %}{{- ', ' }}{%- endif %}"
    "{{- '\"' + pname + '\": ' }}"
    "{%- if prop.get('enum') %}{{- prop['enum'] | map('tojson') | join(' | ') }}"
    "{%- elif prop.get('type') is string %}{{- prop['type'] }}"
    "{%- elif prop.get('type') %}{{- prop['type'] | join(' | ') }}"
    "{%- else %}{{- 'any' }}{%- endif %}"
    "{%- if pname not in required %}{{- ' (optional)' }}{%- endif %}"
    "{%- endfor %}"
    "{{- '}}' }}"
)

DEMO_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call a tool to answer. Each tool is what it does, then the call it takes:\n<tools>' }}"
    "{%- for tool in tools %}" + _TOOL_LINE + "{%- endfor %}"
    "{{- '\n</tools>\n\nTo call a tool, write:\n<tool_call>\n{\"name\": <tool-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
) + HERMES_TURNS
"""The template saved in the demo checkpoint's ``tokenizer_config.json`` (rendered by transformers)."""
