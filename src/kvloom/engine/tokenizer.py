"""Loading a checkpoint's tokenizer (optional: token-id prompts work without one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvloom.errors import CheckpointError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(model_dir: str | Path) -> Any | None:
    """The HF tokenizer in ``model_dir``, or None when the directory holds none."""
    path = Path(model_dir)
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        return None
    from kvloom.engine.progress import import_tqdm_auto_quietly

    import_tqdm_auto_quietly()  # transformers' import would warn in a Jupyter kernel without ipywidgets
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        raise CheckpointError(f"{path}: the tokenizer files could not be loaded: {exc}") from exc
