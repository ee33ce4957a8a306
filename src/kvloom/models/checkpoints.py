"""Random-weight checkpoints by name: their specs, and the on-disk cache they are built into once.

A ``ModelSpec`` is everything ``kvloom.models.tiny.build_checkpoint`` needs; the specs here are the
demo's (``DEMO_MODEL``, ``TINY_DEMO_MODEL`` for tests) and the benchmarks' (``STANDARD_MODEL``, the
~155M CPU checkpoint, and ``DECODE_MODEL_1B``). Nothing here imports ``kvloom.bench``: the demo,
the examples and the tests get their checkpoints without the benchmarks.

Checkpoints are built once per spec into the user's cache directory (``cache_root()``): built in a
temporary sibling directory and renamed into place, so an interrupted build never leaves a
half-written checkpoint behind, and a finished one is never rebuilt. Importing this module is
cheap (torch and transformers load only when a checkpoint is built).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Everything ``kvloom.models.tiny.build_checkpoint`` needs for one random-weight checkpoint.

    ``version`` names the spec; bump it when the builder or the spec changes meaning, so
    caches built from an older spec are not reused. ``build_kwargs`` are JSON values (a dtype
    is named, ``"bfloat16"``), so they hash into ``cache_key`` and are saved beside the weights.
    """

    name: str
    version: str
    build_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def cache_key(self) -> str:
        """``{name}-{version}-{hash of build_kwargs}``: a distinct directory per distinct spec."""
        blob = json.dumps(self.build_kwargs, sort_keys=True).encode()
        return f"{self.name}-{self.version}-{hashlib.sha256(blob).hexdigest()[:12]}"


STANDARD_MODEL = ModelSpec(
    name="bench-llama-155m",
    version="v1",
    build_kwargs=dict(
        arch="llama", vocab_size=32000, hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4,
        intermediate_size=2816, max_position_embeddings=2048, seed=0, with_tokenizer=False,
    ),
)
"""The ~155M checkpoint of the standard CPU benchmark workload (prompts are token ids: no tokenizer)."""

DECODE_MODEL_1B = ModelSpec(
    name="bench-llama-1.1b",
    version="v1",
    build_kwargs=dict(
        arch="llama", vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
        intermediate_size=5632, max_position_embeddings=2048, seed=0, with_tokenizer=False, dtype="bfloat16",
    ),
)
"""TinyLlama-1.1B's shape with random weights, saved in bf16 (``bench decode``'s GPU model: on a GPU
``dtype="auto"`` runs the checkpoint's dtype). ~1.1e9 parameters, 2.2 GB on disk."""

DEMO_MODEL = ModelSpec(
    name="demo-llama",
    version="v3",
    build_kwargs=dict(
        arch="llama", vocab_size=768, hidden_size=384, num_layers=4, num_heads=6, num_kv_heads=2,
        intermediate_size=1024, max_position_embeddings=2048, seed=0, with_tokenizer=True, chat_template="hermes",
    ),
)
"""~6M parameters: builds in a few seconds and answers 8 prompts in a few more on 2 CPU cores.

``vocab_size`` stays just above what the built-in tokenizer corpus trains to (717 tokens): ids
the tokenizer lacks decode to nothing, and random weights would sample them most of the time.
Its chat template is the Qwen / Hermes one (ChatML turns; ``tools`` listed in the system turn,
calls written as ``<tool_call>`` JSON), so agent code with ``tools=`` runs on it as on a real
checkpoint of that family; 2,048 positions leave room for a few tools and turns."""

TINY_DEMO_MODEL = ModelSpec(
    name="demo-llama-tiny",
    version="v2",
    build_kwargs=dict(
        arch="llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, max_position_embeddings=512, seed=0, with_tokenizer=True, chat_template="hermes",
    ),
)
"""For tests (``kvloom demo``'s hidden ``--tiny``): same path as ``DEMO_MODEL``, only smaller."""

_CONFIG_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
                "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
                "head_dim": "head_dim", "intermediate_size": "intermediate_size",
                "max_position_embeddings": "max_position_embeddings", "tie_word_embeddings": "tie_word_embeddings"}


def spec_config(spec: ModelSpec) -> dict[str, Any]:
    """The shape part of the ``config.json`` that ``spec`` builds (config names: ``num_hidden_layers``, ...),
    without building it; the builder's defaults fill what the spec leaves out."""
    import inspect

    from kvloom.models.tiny import build_checkpoint

    defaults = {name: p.default for name, p in inspect.signature(build_checkpoint).parameters.items()}
    kwargs = defaults | spec.build_kwargs
    return {config_key: kwargs[key] for key, config_key in _CONFIG_KEYS.items() if kwargs[key] is not None}


def cache_root() -> Path:
    """``$KVLOOM_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvloom``, else ``~/.cache/kvloom``."""
    if env := os.environ.get("KVLOOM_CACHE_DIR"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "kvloom"
    return Path.home() / ".cache" / "kvloom"


def cached_checkpoint(spec: ModelSpec, *, log: bool = True) -> tuple[Path, bool]:
    """The checkpoint directory for ``spec`` and whether this call built it.

    A directory at the final path is always complete: it appears only by an atomic rename.
    Two processes racing both build; the loser discards its copy and uses the winner's.
    """
    final = cache_root() / "models" / spec.cache_key
    if (final / "config.json").is_file():
        if log:
            print(f"using cached checkpoint {final}", file=sys.stderr)
        return final, False
    from kvloom.models.tiny import build_checkpoint

    final.parent.mkdir(parents=True, exist_ok=True)
    if log:
        print(f"building checkpoint {spec.name} ({spec.version}) into {final} (once) ...", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.cache_key}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0o700 would otherwise stick to the final directory
    try:
        build_checkpoint(tmp, **builder_kwargs(spec.build_kwargs))
        (tmp / "kvloom_spec.json").write_text(json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n")
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
            # Another process finished first; its copy is identical by construction.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final, True


def builder_kwargs(build_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``build_kwargs`` as ``build_checkpoint`` takes them: a spec names its dtype (``"bfloat16"``, JSON in
    the cache key and ``kvloom_spec.json``), the builder takes the ``torch.dtype``."""
    dtype = build_kwargs.get("dtype")
    if not isinstance(dtype, str):
        return build_kwargs
    from kvloom.models.dtype_choice import DTYPES

    return build_kwargs | {"dtype": DTYPES[dtype]}
