"""The README's Quickstart is what CI runs: two commands, the test one verbatim in .ci/run."""

from __future__ import annotations

import re
from pathlib import Path

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
