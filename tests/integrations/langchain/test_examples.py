"""The LangChain examples run as a user runs them: a subprocess on the demo model from the cache."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def run_example(name: str, cache: Path) -> str:
    env = {**os.environ, "KVLOOM_CACHE_DIR": str(cache)}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_langchain_chain_example_streams_and_reuses_the_system_prompt(demo_cache: Path) -> None:
    out = run_example("langchain_chain.py", demo_cache)
    assert out.count("question: ") == 2
    chunks = [int(n) for n in re.findall(r"^\[(\d+) chunks\]$", out, re.M)]
    assert len(chunks) == 2 and all(1 <= n <= 32 for n in chunks), out  # streamed, at most max_tokens
    prompt, cached = map(int, re.search(r"^usage: (\d+) prompt tokens, (\d+) of them read from the cache$",
                                        out, re.M).groups())  # type: ignore[union-attr]
    assert 64 <= cached < prompt, out


def test_langchain_agent_example_calls_a_tool_and_answers(demo_cache: Path) -> None:
    out = run_example("langchain_agent.py", demo_cache)
    call = re.search(r"^tool call: get_weather\(\{'city': '(Paris|Tokyo|Lima)'(, 'days': -?\d+)?\}\) id=call_\w+$",
                     out, re.M)
    assert call, out
    assert re.search(rf"^tool result: {call.group(1)}: ", out, re.M), out
    assert re.search(r"^final answer: ", out, re.M), out
    assert re.search(r"^final turn: \d+ prompt tokens, [1-9]\d* read from the cache$", out, re.M), out
