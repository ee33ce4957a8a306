"""Developer sessions: ``nox -s demo``, ``nox -s tests``, ``nox -s lint``, ``nox -s docs``, ``nox -s stress``,
``nox -s gpu``.

Each session installs kvloom into its own virtualenv. torch is pinned to the CPU-friendly
release by default (KVLOOM_TORCH overrides it, e.g. ``KVLOOM_TORCH=torch`` for whatever pip picks).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests", "lint"]

TORCH = os.environ.get("KVLOOM_TORCH", "torch==2.13.0")
TESTS_ENV = Path(__file__).resolve().parent / ".nox" / "tests"
"""The tests session's virtualenv (nox's default envdir), which lint reuses."""


def _install(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[dev]")  # the dev extra pins transformers below 5.25 (see pyproject.toml)


@nox.session
def demo(session: nox.Session) -> None:
    """Answer on the shipped demo model: a bare install (no extras), then ``kvloom demo``."""
    session.install(TORCH)
    # From a checkout, transformers 5.25+ would import the top-level kernels/ as the hub's `kernels`
    # (see the dev extra's pin in pyproject.toml); an installed kvloom is unaffected.
    session.install("-e", ".", "transformers<5.25")
    session.run("python", "-m", "kvloom", "demo", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite on CPU, one pytest worker a core (at most 4; ``-n 0`` in posargs runs it in
    one process). Triton kernels run under TRITON_INTERPRET=1 (set by their tests)."""
    _install(session)
    # pytest exits 5 when it collects no test: nox fails on any non-zero exit, so that can't pass.
    session.run("pytest", "-q", "-ra", "-n", "auto", "--maxprocesses", "4", *session.posargs)


@nox.session
def stress(session: nox.Session) -> None:
    """The long reliability runs: the property tests with a larger hypothesis budget, the load test at
    2,000 streams, the fault and exhaustion tests scaled up (``KVLOOM_STRESS=1``; minutes, not seconds)."""
    _install(session)
    session.run(
        "pytest", "-q", "-ra", "-s", "--hypothesis-show-statistics",
        "tests/reliability", "tests/kv_cache/test_kv_state_machine.py", "tests/engine/test_scheduler_state_machine.py",
        *session.posargs, env={"KVLOOM_STRESS": "1"},
    )


@nox.session
def gpu(session: nox.Session) -> None:
    """The CUDA path on a CUDA machine: tests/gpu with the compiled Triton kernels (they skip without a
    GPU). Use a CUDA build of torch: ``KVLOOM_TORCH=torch nox -s gpu``."""
    _install(session)
    session.run("pytest", "-q", "-ra", "tests/gpu", *session.posargs, env={"TRITON_INTERPRET": "0"})


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff on everything, mypy --strict on src/, the package layering (import-linter, pyproject.toml).

    Runs in the tests session's virtualenv (mypy needs the same packages installed: torch,
    transformers, ...), so ``nox -s tests lint`` installs them once, not twice; alone, it
    installs that virtualenv first (``nox -s tests --install-only``)."""
    bin_dir = TESTS_ENV / "bin"
    if not (bin_dir / "lint-imports").exists():
        session.run(sys.executable, "-m", "nox", "-s", "tests", "--install-only", external=True)
    session.run(str(bin_dir / "ruff"), "check", "src", "kernels", "tests", "examples", "noxfile.py", external=True)
    session.run(str(bin_dir / "mypy"), external=True)
    session.run(str(bin_dir / "lint-imports"), external=True)


@nox.session
def docs(session: nox.Session) -> None:
    """The docs site (MkDocs + Material + mkdocstrings) in strict mode, into site/; ``mkdocs serve`` previews it."""
    _install(session)
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})
