"""Build and load the C kernels in ``kernels/csrc/`` for the CPU this process runs on.

A kernel source is compiled once per machine kind with the system C compiler (``$CC``, else ``cc``)
into a shared library cached under ``$KVLOOM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/kvloom`` or
``~/.cache/kvloom``), in ``native/``. The file name carries a hash of everything that shapes the
binary (the source, the compiler and its version, the flags, the architecture), so machines of
different kinds that share a home directory never load each other's builds. The vector width is
chosen from what torch reports the CPU can do (``torch.backends.cpu.get_cpu_capability()``), never
``-march=native``, so a build is valid on every CPU with that capability.

The kernels parallelise with OpenMP and link ``libgomp.so.1``. They are loaded only after torch
(this module imports it), so the dynamic loader resolves that name to the OpenMP runtime torch has
already loaded: the kernels share torch's thread pool instead of starting a second one.

Nothing is compiled or loaded at import; :func:`load_library` does it on first use.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
"""Where the kernels' C sources live (installed with the package)."""

_BASE_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-Wall")
_VECTOR_FLAGS: dict[str, tuple[str, ...]] = {
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"),
    "AVX2": ("-mavx2", "-mfma", "-mf16c"),
}
"""Extra flags per ``get_cpu_capability()`` value; any other value (``DEFAULT``, non-x86 CPUs) adds none."""


class NativeBuildError(RuntimeError):
    """A C kernel could not be compiled or loaded here (no compiler, a compile error, a bad library)."""


def cache_dir() -> Path:
    """``$KVLOOM_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvloom``, else ``~/.cache/kvloom``."""
    explicit = os.environ.get("KVLOOM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvloom"


def compile_flags(capability: str | None = None) -> tuple[str, ...]:
    """The compiler flags for a CPU of ``capability`` (default: this one, as torch reports it)."""
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return _BASE_FLAGS + _VECTOR_FLAGS.get(capability, ())


def _compiler() -> str:
    name = os.environ.get("CC") or "cc"
    path = shutil.which(name)
    if path is None:
        raise NativeBuildError(f"no C compiler: {name!r} is not on PATH (set CC, or install gcc)")
    return path


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        raise NativeBuildError(f"the C compiler {compiler!r} does not run: {exc}") from exc
    return done.stdout.splitlines()[0] if done.stdout else ""


def build(name: str, *, flags: tuple[str, ...] | None = None, directory: Path | None = None,
          sources: Path = CSRC) -> Path:
    """Compile ``<sources>/<name>.c`` (which may include the headers beside it) unless a build of it for
    this machine kind is cached in ``directory`` (default ``cache_dir() / "native"``), and return the
    library's path. Concurrent builders are safe: each writes a private file, then renames it.

    Raises :class:`NativeBuildError` with the compiler's own message when compiling fails.
    """
    source = sources / f"{name}.c"
    flags = compile_flags() if flags is None else flags
    compiler = _compiler()
    key = hashlib.sha256()
    headers = [h.read_bytes() for h in sorted(sources.glob("*.h"))]  # what the source may include
    for part in (source.read_bytes(), *headers, compiler.encode(), _compiler_version(compiler).encode(),
                 " ".join(flags).encode(), platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    directory = (cache_dir() / "native") if directory is None else directory
    target = directory / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=directory)
        os.close(fd)
    except OSError as exc:
        raise NativeBuildError(f"cannot write the kernel cache {directory}: {exc} (set KVLOOM_CACHE_DIR)") from exc
    try:
        done = subprocess.run([compiler, *flags, "-o", partial, str(source), "-lm"], capture_output=True,
                              text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise NativeBuildError(f"compiling {source.name} failed ({compiler} exited {done.returncode}):\n"
                                   f"{done.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@functools.cache
def load_library(name: str) -> ctypes.CDLL:
    """``csrc/<name>.c`` built for this machine and loaded, once per process (see :func:`build`)."""
    path = build(name)
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeBuildError(f"cannot load {path}: {exc}") from exc


def threads_for(work_items: int) -> int:
    """The OpenMP threads a kernel that splits ``work_items`` rows among threads should ask for: torch's
    count, but no more than there are rows. A team of two for one row leaves one thread idle at the
    barrier, and if the machine is busy (an event loop, another process) the row's thread then waits for
    the idle one to be scheduled: at one decode row that wait, not the work, was the kernel's cost."""
    return max(1, min(torch.get_num_threads(), work_items))
