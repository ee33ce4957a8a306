"""The package layering: import-linter's contracts (``[tool.importlinter]`` in pyproject.toml) hold.

``lint-imports`` comes with the ``dev`` extra; ``nox -s lint`` runs it too, this test makes the
suite fail on a layering regression as well. kvloom.kernels is installed from ``kernels/``
(``package-dir``), where import-linter does not look: it is checked here with ``ast``.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _lint_imports() -> str:
    beside = Path(sys.executable).parent / "lint-imports"
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.skip("lint-imports is not installed (pip install -e '.[dev]')")
    return found


def _run(exe: str, cwd: Path, src: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if src is not None:  # put this copy of kvloom ahead of the installed one
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    return subprocess.run([exe, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold() -> None:
    result = _run(_lint_imports(), ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "forbidden_import", "contract"),
    [
        ("layers/linear.py", "import kvloom.lora.ops", "LoRA plugs into layers and models"),
        ("kv_cache/manager.py", "import kvloom.scheduler.scheduler", "kv_cache is self-contained"),
        ("models/config.py", "import kvloom.models.registry", "no config <-> registry cycle"),
        ("runner/inputs.py", "import kvloom.engine.core", "Nothing below the engine imports it"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(
    tmp_path: Path, module: str, forbidden_import: str, contract: str
) -> None:
    """The contracts really check this tree: a copy with one forbidden import added fails."""
    exe = _lint_imports()
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "kvloom", src / "kvloom", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _run(exe, tmp_path, src).returncode == 0
    path = src / "kvloom" / module
    path.write_text(path.read_text() + f"\n{forbidden_import}\n")
    result = _run(exe, tmp_path, src)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in " ".join(broken.split()), result.stdout


def test_kernels_import_no_other_kvloom_module() -> None:
    """kvloom.kernels is the bottom layer: its ops may import each other, nothing else of kvloom."""
    offenders = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [alias.name for alias in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            offenders += [
                f"{path.name}:{node.lineno} imports {name}" for name in names
                if name.split(".")[0] == "kvloom" and not (name + ".").startswith("kvloom.kernels.")
            ]
    assert not offenders, offenders
