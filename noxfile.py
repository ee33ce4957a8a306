"""Developer sessions: ``nox -s demo``, ``nox -s tests``, ``nox -s lint``, ``nox -s docs``, ``nox -s stress``,
``nox -s gpu``.

Each session installs kvloom into its own virtualenv. torch is pinned to the CPU-friendly
release by default (KVLOOM_TORCH overrides it, e.g. ``KVLOOM_TORCH=torch`` for whatever pip picks).
"""

from __future__ import annotations

import os

import nox

nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests", "lint"]

TORCH = os.environ.get("KVLOOM_TORCH", "torch==2.13.0")


def _install(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[dev]")  # the dev extra pins transformers below 5.25 (see pyproject.toml)


@nox.session
def demo(session: nox.Session) -> None:
    """Build the embedded demo model (once) and generate from it."""
    _install(session)
    session.run("python", "-m", "kvloom", "demo", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite on CPU. Triton kernels run under TRITON_INTERPRET=1 (set by their tests)."""
    _install(session)
    # pytest exits 5 when it collects no test: nox fails on any non-zero exit, so that can't pass.
    session.run("pytest", "-q", "-ra", *session.posargs)


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


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on everything, mypy --strict on src/, the package layering (import-linter, pyproject.toml)."""
    _install(session)
    session.run("ruff", "check", "src", "kernels", "tests", "examples", "noxfile.py")
    session.run("mypy")
    session.run("lint-imports")


@nox.session
def docs(session: nox.Session) -> None:
    """The docs site (MkDocs + Material + mkdocstrings) in strict mode, into site/; ``mkdocs serve`` previews it."""
    _install(session)
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})
