"""Where the trained demo model lives: a checkpoint directory inside the installed package.

``python -m kvloom.demo_model.train --out DIR`` writes it; ``weights/`` beside this file holds the
copy that ships (config.json, float16 model.safetensors, tokenizer files with the chat template,
generation_config.json, the training log). Reading it needs no network and no cache.
"""

from __future__ import annotations

from pathlib import Path

from kvloom.errors import KvloomError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""The shipped checkpoint directory (package data)."""

NOTICE = ("a tiny model (5M parameters) trained on a synthetic corpus the project generates: it reads a passage,\n"
          "calls tools and writes JSON in simple English; it knows nothing about the world.")


def shipped_model_dir() -> Path:
    """The trained demo checkpoint's directory. Raises ``KvloomError`` when the package was installed
    without its data files (a build that dropped package data)."""
    if not (WEIGHTS_DIR / "config.json").is_file() or not (WEIGHTS_DIR / "model.safetensors").is_file():
        raise KvloomError(
            f"the demo model's files are missing from {WEIGHTS_DIR}: reinstall kvloom (the wheel ships them), "
            "or retrain them with `python -m kvloom.demo_model.train --out DIR` and pass --model DIR")
    return WEIGHTS_DIR
