"""The ``bench`` extra: what ``pip install 'kvloom[bench]'`` adds for the benchmarks (matplotlib for
``bench serve --sweep``'s plots, jsonschema for the validity checks of ``bench structured`` and
``bench tools``). Every benchmark module imports without it: those packages are imported inside
the functions that use them, under ``needs_bench_extra``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

INSTALL = "pip install 'kvloom[bench]'"


@contextmanager
def needs_bench_extra(what: str) -> Iterator[None]:
    """Around an import of the bench extra: an ``ImportError`` becomes one that says ``what`` needs
    which module, and ``INSTALL``."""
    try:
        yield
    except ImportError as exc:
        raise ImportError(f"{what} needs {exc.name or 'a module'} (the bench extra): {INSTALL}") from exc
