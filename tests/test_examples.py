"""The examples run as a user runs them (a subprocess), on a tiny local checkpoint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_structured_output_example(llama_dir: Path) -> None:
    out = run_example("structured_output.py", str(llama_dir))
    assert re.search(r"^sku: +[A-Z]{3}-\d{4}$", out, re.M), out
    assert re.search(r"^answer: (yes|no)$", out, re.M), out
    assert re.search(r"^ticket( \(cut at max_tokens\))?: ", out, re.M), out


def test_multi_lora_example(llama_dir: Path) -> None:
    out = run_example("multi_lora.py", str(llama_dir))
    assert "loaded: tenant-0 (rank 8), tenant-1 (rank 8)" in out
    lines = dict(re.findall(r"^ *(base model|tenant-\d): (.*)$", out, re.M))
    assert set(lines) == {"base model", "tenant-0", "tenant-1"}
    assert len(set(lines.values())) == 3, lines  # each adapter changes the output


def test_offline_batch_example(llama_dir: Path) -> None:
    out = run_example("offline_batch.py", str(llama_dir))
    assert out.count("tokens]") == 3
