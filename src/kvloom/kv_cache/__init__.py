"""kvloom.kv_cache."""
