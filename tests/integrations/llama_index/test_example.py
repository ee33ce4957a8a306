"""``examples/llamaindex_query.py`` runs as a user runs it: a subprocess, no model argument, on
the demo checkpoint (``KVLOOM_CACHE_DIR`` points at a cache that already holds it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "llamaindex_query.py"


def test_the_query_example_answers_from_its_documents(demo_cache: Path) -> None:
    env = {**os.environ, "KVLOOM_CACHE_DIR": str(demo_cache)}
    proc = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^documents: 4$", out, re.M) and re.search(r"^sources: +4$", out, re.M), out
    assert re.search(r"^answer: +\S", out, re.M), out
    structured = re.search(r"^structured: (.*)$", out, re.M)
    assert structured, out
    answer = json.loads(structured.group(1))  # the grammar made it valid JSON of the Answer class
    assert set(answer) == {"topic", "summary"} and answer["topic"] in {"batching", "kv cache", "grammars", "embedding"}
    tokens = re.search(r"^tokens: +(\d+) prompt, (\d+) completion", out, re.M)
    assert tokens and int(tokens.group(1)) > 100 and int(tokens.group(2)) > 0, out
