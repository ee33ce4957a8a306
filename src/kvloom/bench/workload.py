"""The standard benchmark workload and the random-weight checkpoints it runs on.

The standard CPU workload (docs: BENCHMARKS.md): a Llama-shaped ~155M checkpoint with random
float32 weights; 64 requests, prompt lengths uniform in [32, 256] from a fixed seed, random
token ids, exactly 64 output tokens each, greedy, EOS ignored. Every size is overridable.
``bench decode`` runs on ``DECODE_MODEL_1B`` (TinyLlama-1.1B's shape, bf16) by default.

Checkpoints are built once per spec into the user's cache directory (``cache_root()``): built
in a temporary sibling directory and renamed into place, so an interrupted build never leaves
a half-written checkpoint behind, and a finished one is never rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
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
    caches built from an older spec are not reused.
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
"""The ~155M checkpoint of the standard CPU workload (prompts are token ids: no tokenizer)."""

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
        build_checkpoint(tmp, **_builder_kwargs(spec.build_kwargs))
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


def _builder_kwargs(build_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``build_kwargs`` as ``build_checkpoint`` takes them: a spec names its dtype (``"bfloat16"``, JSON in
    the cache key and ``kvloom_spec.json``), the builder takes the ``torch.dtype``."""
    dtype = build_kwargs.get("dtype")
    if not isinstance(dtype, str):
        return build_kwargs
    from kvloom.models.dtype_choice import DTYPES

    return build_kwargs | {"dtype": DTYPES[dtype]}


@dataclass(frozen=True, slots=True)
class Workload:
    """``num_requests`` prompts of random token ids, each to generate exactly ``output_len`` tokens."""

    num_requests: int = 64
    min_prompt_len: int = 32
    max_prompt_len: int = 256
    output_len: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.output_len < 1:
            raise ValueError("num_requests and output_len must be >= 1")
        if not 1 <= self.min_prompt_len <= self.max_prompt_len:
            raise ValueError(f"need 1 <= min_prompt_len <= max_prompt_len, got {self.min_prompt_len}, {self.max_prompt_len}")

    def prompts(self, vocab_size: int) -> list[list[int]]:
        """Deterministic prompts: lengths uniform in [min, max], ids uniform in [0, vocab_size).

        ``random.Random`` (not torch/numpy) so the same seed gives the same prompts whatever
        library versions are installed.
        """
        rng = random.Random(self.seed)
        lengths = [rng.randint(self.min_prompt_len, self.max_prompt_len) for _ in range(self.num_requests)]
        return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


def read_vocab_size(model_dir: Path) -> int:
    """``vocab_size`` from the checkpoint's config.json (top level or ``text_config``)."""
    config = json.loads((model_dir / "config.json").read_text())
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not isinstance(vocab, int):
        raise ValueError(f"{model_dir}/config.json has no integer vocab_size")
    return vocab
