"""The agent workload of ``bench tools``: a shop assistant's system prompt with 8 tools, and
three-turn conversations (a request that must call a tool, the tool's result, a follow-up).

Every string and array in the tools' schemas is bounded, so a constrained call always fits
in the first turn's ``max_tokens`` and a random model (which fills strings to their
``maxLength``) still ends every call; the schemas cover nested objects, enums, arrays of
objects, patterns and required fields.
"""

from __future__ import annotations

import json
from typing import Any

SYSTEM_PROMPT = (
    "You are the operations assistant of an online shop. Answer briefly. When a request needs "
    "data or an action, call one of the tools; never invent order data."
)

_ORDER_ID: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": 99999}
_SKU: dict[str, Any] = {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required,
                       "additionalProperties": False}}}


TOOLS: list[dict[str, Any]] = [
    _tool("get_order", "Look up an order.", {"order_id": _ORDER_ID}, ["order_id"]),
    _tool("search_products", "Search the catalogue.", {
        "query": {"type": "string", "maxLength": 24},
        "category": {"enum": ["books", "garden", "kitchen", "toys"]},
        "max_price_cents": {"type": "integer", "minimum": 1, "maximum": 100000},
        "in_stock": {"type": "boolean"},
    }, ["query"]),
    _tool("create_return", "Return items of an order.", {
        "order_id": _ORDER_ID,
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": _SKU, "quantity": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "quantity"], "additionalProperties": False}},
        "reason": {"enum": ["damaged", "wrong_item", "late", "other"]},
    }, ["order_id", "items", "reason"]),
    _tool("update_address", "Change an order's delivery address.", {
        "order_id": _ORDER_ID,
        "address": {"type": "object", "properties": {
            "street": {"type": "string", "maxLength": 24},
            "city": {"type": "string", "maxLength": 16},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"enum": ["DE", "FR", "IT", "NL", "US"]},
        }, "required": ["street", "city", "zip", "country"], "additionalProperties": False},
    }, ["order_id", "address"]),
    _tool("send_email", "Email a customer.", {
        "customer_id": {"type": "integer", "minimum": 1, "maximum": 999999},
        "subject": {"type": "string", "maxLength": 24},
        "body": {"type": "string", "maxLength": 48},
    }, ["customer_id", "subject", "body"]),
    _tool("schedule_delivery", "Book a delivery slot.", {
        "order_id": _ORDER_ID,
        "date": {"type": "string", "pattern": "^2027-[01][0-9]-[0-3][0-9]$"},
        "window": {"enum": ["morning", "afternoon", "evening"]},
    }, ["order_id", "date", "window"]),
    _tool("apply_discount", "Apply a discount code to an order.", {
        "order_id": _ORDER_ID,
        "code": {"type": "string", "pattern": "^[A-Z0-9]{6}$"},
        "percent": {"type": "integer", "minimum": 5, "maximum": 50},
    }, ["order_id", "code"]),
    _tool("check_inventory", "Stock levels of products.", {
        "skus": {"type": "array", "items": _SKU, "minItems": 1, "maxItems": 3},
        "warehouse": {"enum": ["north", "south", "east"]},
    }, ["skus"]),
]
"""The 8 tools, in the OpenAI Chat Completions shape."""

SCHEMAS: dict[str, dict[str, Any]] = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

_FIRST_TURNS = (
    "Where is my order {n}?",
    "Find me a kitchen timer under {p} euros.",
    "Order {n} arrived damaged, I want to return two mugs.",
    "Please send order {n} to my new address in Lyon.",
    "Email customer {n} that the parcel is late.",
    "Can order {n} come on a Saturday morning?",
    "Apply my code SAVE{d} to order {n}.",
    "Do you still have the blue garden hose in stock?",
)
_FOLLOW_UPS = (
    "Thanks. Anything else I should know?",
    "Great, and how long will that take?",
    "OK. Can you confirm that in one sentence?",
    "Perfect, thank you!",
)


def first_turn(i: int) -> str:
    """Conversation ``i``'s opening request (the 8 kinds in turn, numbers varying)."""
    return _FIRST_TURNS[i % len(_FIRST_TURNS)].format(n=1000 + 37 * i, p=10 + i % 40, d=10 + i % 90)


def follow_up(i: int) -> str:
    """Conversation ``i``'s third-turn message."""
    return _FOLLOW_UPS[i % len(_FOLLOW_UPS)]


def tool_result(name: str, i: int) -> str:
    """A short, fixed result for a call of ``name`` in conversation ``i`` (the tools are not run)."""
    return json.dumps({"tool": name, "ok": True, "reference": f"R{i:05d}"})
