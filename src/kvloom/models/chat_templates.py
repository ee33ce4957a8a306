"""Chat templates for the tiny checkpoints: plain ChatML, and two with tool support.

The tool templates follow the two families' published templates in what matters to an
engine (where the tools are listed, how a call and a tool result are written), over the tiny
tokenizer's ChatML special tokens:

- ``hermes`` (Qwen2.5, Hermes): tools as JSON lines inside ``<tools></tools>`` in the system
  turn; a call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``; tool
  results come back in a user turn inside ``<tool_response></tool_response>``.
- ``llama3`` (Llama 3.1 JSON tool calling): tools as JSON in the first user turn; a call is the
  bare object ``{"name": ..., "parameters": {...}}``; results come back in an ``ipython`` turn.
"""

from __future__ import annotations

from typing import Literal

ChatTemplateName = Literal["chatml", "hermes", "llama3"]

# Every turn is "<|im_start|>{role}\n{content}<|im_end|>\n"; generation opens an assistant turn.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

HERMES_TURNS = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.get('content') %}{{- '\n' + message['content'] }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call.get('function') else call %}"
    "{{- '\n<tool_call>\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
"""The Hermes turns after the system turn: user and assistant turns, calls as ``<tool_call>`` JSON, tool
results in a user turn inside ``<tool_response>``, and the generation prompt. Templates that list tools
their own way (the demo model's, ``kvloom.demo_model.template``) end with these."""

HERMES = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
) + HERMES_TURNS

LLAMA3 = (
    "{%- set ns = namespace(tools_done=false) %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' and tools and not ns.tools_done %}"
    "{%- set ns.tools_done = true %}"
    "{{- '<|im_start|>user\nGiven the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\nRespond in the format "
    "{\"name\": function name, \"parameters\": dictionary of argument name and its value}. "
    "Do not use variables.\n\n' }}"
    "{%- for tool in tools %}{{- (tool | tojson) + '\n\n' }}{%- endfor %}"
    "{{- message['content'] + '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call.get('function') else call %}"
    "{{- '<|im_start|>assistant\n{\"name\": \"' + fn['name'] + '\", \"parameters\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>ipython\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {"chatml": CHATML, "hermes": HERMES, "llama3": LLAMA3}
