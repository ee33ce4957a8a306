"""What every test in tests/gpu needs: the compiled Triton kernels, not the interpreter.

Each module skips itself (visibly) without CUDA; a skipped test never runs this fixture, so the
CPU suite (which sets ``TRITON_INTERPRET=1`` for tests/kernels) is unaffected.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module", autouse=True)
def compiled_triton() -> None:
    """Fail (not skip) when the kernels would run interpreted: that would test nothing new."""
    if os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes"):
        pytest.fail("tests/gpu test the compiled kernels: run them with TRITON_INTERPRET=0 (now 1)")
