"""The skeleton every offline benchmark shares; each keeps only its own measurement.

A benchmark's ``run(args, argv)`` goes:

1. check its flags: on a bad one, ``refuse`` (one line naming the benchmark on stderr, exit status 2),
   before anything slow;
2. ``start``: print the command and the machine, with ceilings measured now, and find or build the
   checkpoint (``--model``, else a random one from ``kvloom.models.checkpoints``, built once);
   ``workload_prompts`` prints the standard workload's line and makes its prompts;
3. build its systems and let them ``take_turns``: ``--repeats`` rounds, every system once a round,
   in a fixed order (A B C A B C), so the machine's drift hits each alike; a peer that fails is
   reported, not fatal;
4. reduce the runs (``rounded_median``, or the best of them) into its result dict, headed by
   ``BenchRun.envelope`` (or ``flat_envelope``: the older benchmarks' keys);
5. print its report and ``write_result`` the JSON (``--json``).

Nothing here measures a system: ``machine`` measures the machine, each benchmark its systems.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from kvloom.bench import machine
from kvloom.bench.workload import Workload, read_vocab_size
from kvloom.models.checkpoints import STANDARD_MODEL, ModelSpec, cached_checkpoint

if TYPE_CHECKING:
    from kvloom.models.dtype_choice import DTypeChoice

T = TypeVar("T")
USAGE_ERROR = 2
"""A benchmark's exit status on a bad flag (argparse's own usage errors exit 2 as well)."""


def command_line(bench: str, argv: Sequence[str]) -> str:
    """The command that reruns this benchmark: ``python -m kvloom`` and ``argv`` (the command line's
    arguments), with ``bench <name>`` put in front when ``argv`` holds only the benchmark's flags."""
    words = list(argv)
    if not any(words[i : i + 2] == ["bench", bench] for i in range(len(words))):
        words = ["bench", bench, *words]
    return "python -m kvloom " + shlex.join(words)


def refuse(bench: str, problem: Exception | str) -> int:
    """Print a bad flag's problem as ``bench <name>: ...`` on stderr; the exit status to return."""
    print(f"bench {bench}: {problem}", file=sys.stderr)
    return USAGE_ERROR


def add_quick(parser: argparse.ArgumentParser) -> None:
    """The hidden ``--quick`` of every benchmark: shorter ceiling measurements (tests), the same
    measurements with fewer repeats."""
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)


@dataclass(frozen=True, slots=True)
class BenchRun:
    """What ``start`` found: the command, the machine and its ceilings, the checkpoint."""

    command: str
    argv: list[str]
    info: dict[str, Any]
    ceilings: dict[str, float]
    model_dir: Path
    spec: ModelSpec | None
    """The random checkpoint's spec; None when ``--model`` named the checkpoint."""

    def model_entry(self) -> dict[str, Any]:
        """The result's ``model``: its path, and the spec's cache key (None for ``--model``)."""
        return {"path": str(self.model_dir), "spec": None if self.spec is None else self.spec.cache_key}

    def envelope(self, benchmark: str, schema_version: int, *, mode: str | None = None,
                 ceilings: Mapping[str, float] | None = None) -> dict[str, Any]:
        """The head of a result: ``benchmark`` (and ``mode``), ``schema_version``, ``command``, ``argv``,
        ``timestamp``, ``machine`` (with ``ceilings``: these, else those measured at the start), ``model``."""
        return {"benchmark": benchmark, **({"mode": mode} if mode is not None else {}),
                "schema_version": schema_version, "command": self.command, "argv": list(self.argv),
                "timestamp": timestamp(), "machine": {**self.info, "ceilings": dict(ceilings or self.ceilings)},
                "model": self.model_entry()}

    def flat_envelope(self, bench: str, schema_version: int) -> dict[str, Any]:
        """The head of a result in the keys ``bench lora``, ``structured`` and ``tools`` have always
        written: ``schema_version``, ``bench``, ``command``, ``date``, ``machine``, ``ceilings``, ``model``
        (the checkpoint's path)."""
        return {"schema_version": schema_version, "bench": bench, "command": self.command, "date": timestamp(),
                "machine": self.info, "ceilings": self.ceilings, "model": str(self.model_dir)}


def header(command: str, model: str | Path | None, quick: bool, spec: ModelSpec = STANDARD_MODEL, *,
           show_auto_dtype: bool = True) -> tuple[dict[str, Any], dict[str, float], Path]:
    """Print the command and the machine (ceilings measured now) and, with ``show_auto_dtype``, what
    ``dtype="auto"`` picks here; the machine's facts, its ceilings and the checkpoint dir: ``model``,
    else ``spec``'s cached random checkpoint (built once). A ``model`` that is not a directory
    raises ``NotADirectoryError`` before anything is printed or measured."""
    if model is not None and not Path(model).is_dir():
        raise NotADirectoryError(f"--model: {model} is not a directory")
    print(f"command: {command}")
    info = machine.describe()
    ceilings = machine.measure_ceilings(quick=quick)
    print(machine.format_machine(info, ceilings))
    if show_auto_dtype:
        auto = auto_dtype()
        info["auto_dtype"] = {"dtype": auto.name, "reason": auto.reason}
        print(f"dtype='auto' here: {auto.name} ({auto.reason})")
    model_dir = Path(model) if model else cached_checkpoint(spec)[0]
    return info, ceilings, model_dir


def start(bench: str, argv: Sequence[str], model: str | Path | None, quick: bool,
          spec: ModelSpec = STANDARD_MODEL, *, show_auto_dtype: bool = True) -> BenchRun:
    """``header`` for benchmark ``bench`` run with ``argv``, as a ``BenchRun``."""
    command = command_line(bench, argv)
    info, ceilings, model_dir = header(command, model, quick, spec, show_auto_dtype=show_auto_dtype)
    return BenchRun(command, list(argv), info, ceilings, model_dir, None if model else spec)


def auto_dtype() -> DTypeChoice:
    """What ``dtype="auto"`` picks for a CPU engine on this machine (a checkpoint stored in float32)."""
    import torch

    from kvloom.models.dtype_choice import choose_dtype

    return choose_dtype("auto", torch.float32, torch.device("cpu"))


def workload_prompts(model_dir: Path, workload: Workload, how: str) -> list[list[int]]:
    """``workload``'s prompts for the checkpoint's vocabulary, after printing the model and the
    workload; ``how`` ends the workload line (repeats, arrivals, ...)."""
    prompts = workload.prompts(read_vocab_size(model_dir))
    print(f"model: {model_dir}\nworkload: {workload.num_requests} requests, prompts {workload.min_prompt_len}-"
          f"{workload.max_prompt_len} tokens ({sum(len(p) for p in prompts)} in all), {workload.output_len} output "
          f"tokens each, greedy, EOS ignored; {how}")
    return prompts


@dataclass(frozen=True, slots=True)
class System(Generic[T]):
    """One contender: ``run`` makes one timed pass and returns what it measured."""

    name: str
    """Unique among the systems taking turns: the key of its runs and its error."""
    run: Callable[[], T]
    fallible: bool = False
    """A peer: an exception in a pass becomes its error (``"Type: message"``) and it sits out the
    passes after. Otherwise the exception propagates: without kvloom there is nothing to measure."""
    label: str | None = None
    """The name in the progress lines, when not ``name``."""


@dataclass(frozen=True, slots=True)
class Turns(Generic[T]):
    """Each system's passes in order, and its error (None: it never failed)."""

    runs: dict[str, list[T]]
    errors: dict[str, str | None]


def take_turns(systems: Sequence[System[T]], repeats: int, *, errors: Mapping[str, str | None] | None = None,
               progress: str | None = "  pass {rep}: {name} ...") -> Turns[T]:
    """``repeats`` rounds, each running every system once in the order given; a system with an
    error in ``errors`` (it failed to load or to warm up) never runs. ``progress``, formatted with
    ``rep`` (from 1) and ``name``, goes to stderr before each pass (None: nothing)."""
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"systems taking turns need distinct names, got {names}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    failed: dict[str, str | None] = {n: (errors or {}).get(n) for n in names}
    runs: dict[str, list[T]] = {n: [] for n in names}
    for rep in range(1, repeats + 1):
        for system in systems:
            if failed[system.name] is not None:
                continue
            if progress is not None:
                print(progress.format(rep=rep, name=system.label or system.name), file=sys.stderr, flush=True)
            if not system.fallible:
                runs[system.name].append(system.run())
                continue
            try:
                runs[system.name].append(system.run())
            except Exception as exc:  # transformers' APIs move, a GPU may run out of memory: report, don't crash
                failed[system.name] = describe_error(exc)
    return Turns(runs, failed)


def describe_error(exc: BaseException) -> str:
    """A failure as a result records it: ``"TypeError: message"``."""
    return f"{type(exc).__name__}: {exc}"


def attempt(fn: Callable[[], object]) -> str | None:
    """Call ``fn`` (a peer's load or warm-up); its failure described, or None when it ran."""
    try:
        fn()
    except Exception as exc:  # transformers' APIs move; report, don't crash the whole bench
        return describe_error(exc)
    return None


def rounded_median(values: Sequence[float], digits: int) -> float:
    """The median of several passes, rounded for the JSON."""
    return round(statistics.median(values), digits)


def timestamp() -> str:
    """Now, UTC, to the second (ISO 8601): when a result was written."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_result(path: Path | None, result: dict[str, Any]) -> None:
    """Write a benchmark's result as indented JSON (diffable), if a path was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
