"""The README's Quickstart is what CI runs: two commands, the test one verbatim in .ci/run."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_quickstart_is_two_commands_demo_then_tests() -> None:
    commands = quickstart_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands), "each command is one line to copy"
    assert commands[0].endswith("nox -s demo")
    assert "nox -s tests" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert quickstart_commands()[1] in ci.splitlines()


def test_nox_sessions_exist() -> None:
    """Every ``nox -s NAME`` the README mentions is a session of the noxfile."""
    noxfile = (ROOT / "noxfile.py").read_text()
    named = set(re.findall(r"nox -s ([a-z]+(?: [a-z]+)*)", (ROOT / "README.md").read_text()))
    sessions = {name for group in named for name in group.split()}
    assert {"demo", "tests", "lint", "stress", "gpu", "docs"} <= sessions
    for session in sessions:
        assert re.search(rf"^def {session}\(session", noxfile, flags=re.M), session


def python_snippet(containing: str) -> str:
    """The README's one ``python`` block that contains ``containing``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
              if containing in b]
    assert len(blocks) == 1, f"{len(blocks)} python blocks contain {containing!r}"
    return str(blocks[0])


def test_the_llm_snippet_runs_on_the_demo_model(
    checkpoint_factory: Callable[..., Path], capsys: pytest.CaptureFixture[str],
) -> None:
    """The synchronous facade's snippet, as written, with a checkpoint directory as its path: the
    tests' small demo model (``python -m kvloom demo --tiny``: the demo's tokenizer and chat
    template, a smaller vocabulary than any real checkpoint)."""
    from kvloom.demo import TINY_DEMO_MODEL

    demo_dir = checkpoint_factory(**TINY_DEMO_MODEL.build_kwargs)
    snippet = python_snippet("llm = LLM(")
    path = re.search(r'LLM\("([^"]+)"\)', snippet)
    assert path is not None, "the snippet builds LLM from a checkpoint directory"
    namespace: dict[str, object] = {}
    try:
        exec(snippet.replace(path.group(1), str(demo_dir)), namespace)
    finally:
        llm = namespace.get("llm")
        if llm is not None:
            llm.close()  # type: ignore[attr-defined]
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) >= 2 and "Usage(" in "\n".join(printed), printed


def test_the_outlines_snippet_says_a_script_needs_the_main_guard() -> None:
    """outlines compiles in a ``spawn`` process pool, which imports the main module in every worker."""
    readme = (ROOT / "README.md").read_text()
    outlines = readme.index('grammar_backend="outlines"')
    paragraph_after = readme[outlines:].split("\n\n", 2)[1]
    assert 'if __name__ == "__main__":' in paragraph_after and "spawn" in paragraph_after, paragraph_after
