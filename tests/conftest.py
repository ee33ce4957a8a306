"""Session-wide fixtures: tiny real HF checkpoints built locally (random weights, trained tokenizer)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture
def fresh_kernel_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty C-kernel cache (``KVLOOM_CACHE_DIR``), and no kernel library already loaded in this
    process: the next kernel use builds from scratch. Yields the cache root."""
    from kvloom.kernels import elementwise_cpu, int8_linear_cpu, native, paged_decode_attention_cpu

    monkeypatch.setenv("KVLOOM_CACHE_DIR", str(tmp_path))
    loaders = (native.load_library, paged_decode_attention_cpu.load, elementwise_cpu.load, int8_linear_cpu.load)
    for cached in loaders:
        cached.cache_clear()
    yield tmp_path
    for cached in loaders:
        cached.cache_clear()


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``factory(arch="llama", **overrides) -> Path``; each distinct spec is built once per session."""
    from kvloom.models.tiny import build_checkpoint

    built: dict[str, Path] = {}

    def factory(**spec: object) -> Path:
        key = repr(sorted(spec.items()))
        if key not in built:
            out = tmp_path_factory.mktemp(str(spec.get("arch", "llama")))
            built[key] = build_checkpoint(out, **spec)  # type: ignore[arg-type]
        return built[key]

    return factory


@pytest.fixture(scope="session")
def llama_dir(checkpoint_factory: Callable[..., Path]) -> Path:
    return checkpoint_factory(arch="llama")


@pytest.fixture(scope="session")
def demo_dir(checkpoint_factory: Callable[..., Path]) -> Path:
    """The demo model (``python -m kvloom demo``'s checkpoint), built from its spec."""
    from kvloom.demo import DEMO_MODEL

    return checkpoint_factory(**DEMO_MODEL.build_kwargs)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``KVLOOM_CACHE_DIR`` holding the demo model, for subprocesses that call ``demo_model_dir()``."""
    import os

    from kvloom.models.checkpoints import DEMO_MODEL, cached_checkpoint

    root = tmp_path_factory.mktemp("kvloom-cache")
    old = os.environ.get("KVLOOM_CACHE_DIR")
    os.environ["KVLOOM_CACHE_DIR"] = str(root)
    try:
        cached_checkpoint(DEMO_MODEL, log=False)
    finally:
        if old is None:
            del os.environ["KVLOOM_CACHE_DIR"]
        else:
            os.environ["KVLOOM_CACHE_DIR"] = old
    return root


@pytest.fixture(autouse=True)
def float32_unless_asked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process engines run in float32 on every machine: ``dtype="auto"`` would pick bf16 on a
    CPU with AMX or AVX512-BF16, and the parity tests compare with transformers in float32.
    Tests of that choice mark themselves ``real_cpu_dtype`` (or fake the CPU themselves)."""
    if request.node.get_closest_marker("real_cpu_dtype"):
        return
    from kvloom.models.dtype_choice import CpuMatmulSupport
    from tests.fakes import fake_cpu

    fake_cpu(monkeypatch, CpuMatmulSupport(amx=False, avx512_bf16=False))
