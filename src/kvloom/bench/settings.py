"""kvloom's settings in a benchmark: ``--kvloom-config KEY=VALUE ...``, and the pool sizing the
offline benchmarks give it by default (the whole workload's KV resident, every request at once)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any


def add_kvloom_config(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    """The ``--kvloom-config KEY=VALUE ...`` flag (repeatable; ``parse_config`` reads it)."""
    parser.add_argument("--kvloom-config", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=help_text)


def parse_config(items: Sequence[str]) -> dict[str, Any]:
    """``["block_size=16", "dtype=float32"]`` -> ``{"block_size": 16, "dtype": "float32"}`` (JSON values, else strings)."""
    config: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--kvloom-config: expected KEY=VALUE, got {item!r}")
        try:
            config[key] = json.loads(raw)
        except json.JSONDecodeError:
            config[key] = raw
    return config


def kvloom_config(user: dict[str, Any], prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """kvloom's settings: its defaults (``dtype="auto"`` included), except that (unless the user sized
    them) the KV pool holds the whole workload at once, as the continuous-batching peer's does, and
    every request may run at once; user settings win."""
    from kvloom.config import CacheConfig, SchedulerConfig

    config: dict[str, Any] = {}
    if "num_kv_blocks" not in user and "kv_cache_memory" not in user:
        block = int(user.get("block_size", CacheConfig.model_fields["block_size"].default))
        config["num_kv_blocks"] = sum(-(-(len(p) + output_len) // block) + 1 for p in prompts)
    if "max_num_seqs" not in user:
        config["max_num_seqs"] = max(len(prompts), SchedulerConfig.model_fields["max_num_seqs"].default)
    return config | user
