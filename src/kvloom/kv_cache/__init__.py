"""Paged KV cache bookkeeping: physical blocks (block_pool) and per-request tables (manager)."""
