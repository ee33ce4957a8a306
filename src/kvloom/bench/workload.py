"""The standard benchmark workload and the random-weight checkpoints it runs on.

The standard CPU workload (docs: BENCHMARKS.md): a Llama-shaped ~155M checkpoint with random
float32 weights; 64 requests, prompt lengths uniform in [32, 256] from a fixed seed, random
token ids, exactly 64 output tokens each, greedy, EOS ignored. Every size is overridable.

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
        build_checkpoint(tmp, **spec.build_kwargs)
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
