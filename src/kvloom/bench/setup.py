"""What every benchmark does first: print the command and the machine (with ceilings measured
in this run), find or build the checkpoint, make the workload's prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvloom.bench import machine
from kvloom.bench.workload import STANDARD_MODEL, ModelSpec, Workload, cached_checkpoint, read_vocab_size

if TYPE_CHECKING:
    from kvloom.models.dtype_choice import DTypeChoice


@dataclass(frozen=True)
class BenchSetup:
    info: dict[str, Any]
    ceilings: dict[str, float]
    model_dir: Path
    prompts: list[list[int]]


def header(command: str, model: str | Path | None, quick: bool,
           spec: ModelSpec = STANDARD_MODEL) -> tuple[dict[str, Any], dict[str, float], Path]:
    """Print the command and the machine (ceilings measured now); the checkpoint dir: ``model``,
    else ``spec``'s cached random checkpoint (built once)."""
    if model is not None and not Path(model).is_dir():
        raise NotADirectoryError(f"--model: {model} is not a directory")
    print(f"command: {command}")
    info = machine.describe()
    ceilings = machine.measure_ceilings(quick=quick)
    print(machine.format_machine(info, ceilings))
    auto = auto_dtype()
    info["auto_dtype"] = {"dtype": auto.name, "reason": auto.reason}
    print(f"dtype='auto' here: {auto.name} ({auto.reason})")
    model_dir = Path(model) if model else cached_checkpoint(spec)[0]
    return info, ceilings, model_dir


def auto_dtype() -> DTypeChoice:
    """What ``dtype="auto"`` picks for a CPU engine on this machine (a checkpoint stored in float32)."""
    import torch

    from kvloom.models.dtype_choice import choose_dtype

    return choose_dtype("auto", torch.float32, torch.device("cpu"))


def prepare(command: str, model: str | Path | None, quick: bool, workload: Workload, how: str) -> BenchSetup:
    """Print the run's header; ``how`` ends the workload line (repeats, arrivals, ...)."""
    info, ceilings, model_dir = header(command, model, quick)
    prompts = workload.prompts(read_vocab_size(model_dir))
    print(f"model: {model_dir}\nworkload: {workload.num_requests} requests, prompts {workload.min_prompt_len}-"
          f"{workload.max_prompt_len} tokens ({sum(len(p) for p in prompts)} in all), {workload.output_len} output "
          f"tokens each, greedy, EOS ignored; {how}")
    return BenchSetup(info, ceilings, model_dir, prompts)


def write_result(path: Path | None, result: dict[str, Any]) -> None:
    """Write a benchmark's result as indented JSON (diffable), if a path was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
