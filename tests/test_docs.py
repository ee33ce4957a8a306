"""The docs site builds in strict mode: a broken link, a page missing from the nav or an API
reference entry that no longer resolves fails the test suite, not only ``nox -s docs``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # mkdocstrings rendered the reference from the docstrings (an empty page would still build).
    engines = (site / "reference" / "engines" / "index.html").read_text()
    for anchor in ("kvloom.AsyncEngine.stream", "kvloom.AsyncEngine.cache_prefix", "kvloom.LLM.generate"):
        assert f'id="{anchor}"' in engines, anchor
    assert 'id="kvloom.SamplingParams.response_format"' in (site / "reference" / "params" / "index.html").read_text()
    # The existing pages are in the site, and the nav covers every page (strict: omitted files warn).
    for page in ("design", "benchmarks", "getting-started", "concepts"):
        assert (site / page / "index.html").is_file(), page
