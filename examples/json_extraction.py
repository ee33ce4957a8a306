"""JSON extraction into a pydantic model: a batch of texts in, validated objects out.

Run: python examples/json_extraction.py [MODEL_DIR]
``response_format=Contact`` constrains decoding to Contact's JSON schema, so every output parses
and validates (``finish_reason == "stop"``); field bounds (max_length, ge/le) keep it short.
Without MODEL_DIR it uses the shipped demo model (5M parameters, trained on a synthetic corpus:
it copies most values from the text, not all); each output validates whatever the values, because
the grammar, not the model, decides what may be written.
"""

from __future__ import annotations

import sys
from typing import Literal

from pydantic import BaseModel, Field

from kvloom import LLM, SamplingParams
from kvloom.demo import demo_model_dir


class Contact(BaseModel):
    name: str = Field(max_length=16)
    company: str | None = Field(None, max_length=16)
    role: Literal["engineer", "sales", "support", "manager", "other"]
    years_at_company: int = Field(ge=0, le=50)


TEXTS = [
    "Hi, I'm Dana Whitfield, support lead at Northwind; I've been here for six years.",
    "Marco from the Acme sales team here. Joined last spring.",
    "Signed: Priya Raman, Staff Engineer (11 years with Globex).",
]


def main() -> None:
    llm = LLM(sys.argv[1] if len(sys.argv) > 1 else demo_model_dir())  # the demo is built once
    conversations = [[{"role": "system", "content": "Extract the sender as JSON."}, {"role": "user", "content": text}]
                     for text in TEXTS]
    # A pydantic class, its model_json_schema() dict, or {"type": "json_object"} all work here.
    params = SamplingParams(response_format=Contact, temperature=0.0, max_tokens=128)
    for text, out in zip(TEXTS, llm.chat(conversations, params), strict=True):
        print(f"text:    {text}")
        if out.finish_reason != "stop":  # only max_tokens can cut a constrained output short
            print(f"cut at max_tokens: {out.text!r}")
            continue
        contact = Contact.model_validate_json(out.text)  # raises if it does not validate
        print(f"contact: {contact!r}")
        print(f"json:    {contact.model_dump_json()}")


if __name__ == "__main__":  # the guard matters: grammar compile pools may start processes
    main()
