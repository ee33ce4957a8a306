"""A plain ``pip install kvloom`` works: every module imports with the declared dependencies alone.

The test environment holds the ``dev`` extra, which pulls in far more than kvloom declares, so an
undeclared import (one that some other package happens to bring along) passes every other test and
fails only for a user. Two kinds of check close that gap:

- ``test_every_third_party_import_is_declared`` (static, fast): each third-party module that
  ``src/kvloom`` or ``kernels/`` imports, lazily or not, comes from a distribution named in
  ``[project] dependencies``, or in the extra of the module that imports it (``MODULE_EXTRAS``,
  ``OPTIONAL_IMPORTS``). A dependency of a dependency does not count: any release may drop it.
- the install tests (slow): a fresh virtualenv gets kvloom's wheel, built by pip from this
  checkout's files and installed by pip (not editable: pyproject.toml's package list, package data
  and console script are exercised), and exactly the distributions that kvloom's declared
  requirements reach, transitively, in this environment: symlinked, not downloaded, so they are the
  versions the rest of the suite runs against, and it takes seconds. ``pip check`` confirms the set
  satisfies every requirement in it; then tests/install_check.py, run by that virtualenv's
  interpreter outside the checkout, imports every module and every third-party module each one
  imports. The base virtualenv has the core requirements only. Each extra gets a virtualenv of its
  own that sees the base one (a ``.pth`` file) and adds what that extra's requirements reach.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.install_check import extra_of, third_party_imports

ROOT = Path(__file__).resolve().parent.parent
CHECK_SCRIPT = Path(__file__).resolve().parent / "install_check.py"

MODULE_EXTRAS = {
    "kvloom.integrations.langchain": "langchain",
    "kvloom.integrations.llama_index": "llama-index",
    "kvloom.integrations.openai_server": "server",
    "kvloom.serve": "server",
    "kvloom.engine.prometheus": "prometheus",
    "kvloom.bench": "bench",
}
"""Modules (a name covers everything below it) that need an extra: their imports may come from it."""

OPTIONAL_IMPORTS = {
    "kvloom.integrations.openai_server.metrics": {"prometheus_client": "prometheus"},
}
"""``{module: {top-level import: extra}}``: imports a module makes only for a feature of another
extra, failing with a message that names it (``GET /metrics`` without prometheus-client)."""

EXTRAS_WITHOUT_MODULES = frozenset({"dev", "docs"})
"""Extras for working on kvloom, not for using one of its modules."""

RUNTIME_PROVIDED = {"trio": "imported only while trio runs the engine, so the caller has it already"}
"""Third-party modules kvloom imports without declaring them, and why that is sound."""


def _project() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        project: dict[str, object] = tomllib.load(f)["project"]
    return project


def _core_requirements() -> list[str]:
    requirements = _project()["dependencies"]
    assert isinstance(requirements, list)
    return [str(r) for r in requirements]


def _extra_requirements() -> dict[str, list[str]]:
    extras = _project()["optional-dependencies"]
    assert isinstance(extras, dict)
    return {str(name): [str(r) for r in reqs] for name, reqs in extras.items()}


def _extras_for_modules() -> list[str]:
    return sorted(set(_extra_requirements()) - EXTRAS_WITHOUT_MODULES)


def _names(requirements: Iterable[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def source_modules() -> dict[str, Path]:
    """``{module name: file}`` as an install lays them out: ``src/kvloom`` is ``kvloom``,
    ``kernels/`` is ``kvloom.kernels`` (``package-dir`` in pyproject.toml)."""
    modules: dict[str, Path] = {}
    for root, package in ((ROOT / "src" / "kvloom", "kvloom"), (ROOT / "kernels", "kvloom.kernels")):
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


class Environment:
    """The distributions installed for this interpreter, indexed once: by normalized name (the
    first on ``sys.path`` wins, as for imports), and by the paths of site-packages they own.

    Invariant: ``owners[path]`` is every distribution with a recorded file at or below ``path``
    (a tuple of path parts relative to ``site``), ``children[path]`` the entries below it that
    some distribution owns; files recorded outside site-packages (scripts) are not indexed."""

    def __init__(self) -> None:
        self.installed: dict[str, importlib.metadata.Distribution] = {}
        for dist in importlib.metadata.distributions():
            self.installed.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
        sites = {Path(str(d.locate_file(""))) for d in self.installed.values()}
        assert len(sites) == 1, f"the install tests link one site-packages; distributions lie in {sorted(sites)}"
        (self.site,) = sites
        self.owners: dict[tuple[str, ...], set[str]] = defaultdict(set)
        self.children: dict[tuple[str, ...], set[str]] = defaultdict(set)
        for name, dist in self.installed.items():
            for file in dist.files or ():
                parts = PurePosixPath(str(file)).parts
                if not parts or parts[0] == "..":
                    continue
                for depth in range(1, len(parts) + 1):
                    self.owners[parts[:depth]].add(name)
                    self.children[parts[: depth - 1]].add(parts[depth - 1])

    def provided_by(self, module: str) -> set[str]:
        """The distributions that install ``module``: those owning its deepest package or module
        file here (``llama_index.core.x`` is llama-index-core's, though others share the namespace)."""
        parts = tuple(module.split("."))
        for depth in range(len(parts), 0, -1):
            parent, leaf = parts[: depth - 1], parts[depth - 1]
            found = set().union(*(self.owners[(*parent, child)] for child in self.children[parent]
                                  if child == leaf or (child.split(".")[0] == leaf and child.endswith((".py", ".so")))))
            if found:
                return found
        return set()

    def closure(self, requirements: Iterable[str]) -> set[str]:
        """The distributions ``requirements`` reach here, following each one's own requirements
        (markers evaluated for this interpreter and the extras asked of it). Each must be
        installed, at a version the requirement allows."""
        reached: set[str] = set()
        done: set[tuple[str, str]] = set()
        todo = [(Requirement(r), "") for r in requirements]
        while todo:
            req, for_extra = todo.pop()
            if req.marker is not None and not req.marker.evaluate({"extra": for_extra}):
                continue
            name = canonicalize_name(req.name)
            dist = self.installed.get(name)
            assert dist is not None, f"{req} is not installed in this environment ({sys.prefix})"
            assert req.specifier.contains(dist.version, prereleases=True), f"{req}: {dist.version} is installed"
            reached.add(name)
            for extra in {"", *req.extras} - {e for n, e in done if n == name}:
                done.add((name, extra))
                todo.extend((Requirement(r), extra) for r in dist.requires or ())
        return reached

    def link(self, names: set[str], site_packages: Path) -> None:
        """Make the distributions ``names`` importable from ``site_packages`` by symlinks to their
        files here: a whole directory where only they own files in it, else entry by entry (a
        namespace shared with others)."""

        def place(entry: tuple[str, ...]) -> None:
            if self.owners[entry] <= names:
                if os.path.lexists(self.site.joinpath(*entry)):
                    site_packages.joinpath(*entry).symlink_to(self.site.joinpath(*entry))
                return
            site_packages.joinpath(*entry).mkdir(exist_ok=True)
            for child in sorted(self.children[entry]):
                if self.owners[(*entry, child)] & names:
                    place((*entry, child))

        for top in sorted(self.children[()]):
            if self.owners[(top,)] & names:
                place((top,))


@pytest.fixture(scope="module")
def environment() -> Environment:
    return Environment()


def test_the_extra_tables_name_real_extras() -> None:
    """MODULE_EXTRAS covers exactly pyproject's extras but dev and docs (so each has an install
    test), and OPTIONAL_IMPORTS names modules and extras that exist."""
    assert set(MODULE_EXTRAS.values()) == set(_extras_for_modules())
    assert set(_extra_requirements()) >= EXTRAS_WITHOUT_MODULES
    assert {e for imports in OPTIONAL_IMPORTS.values() for e in imports.values()} <= set(_extras_for_modules())
    assert set(OPTIONAL_IMPORTS) <= set(source_modules())


def test_third_party_imports_include_lazy_ones_but_not_type_checking_ones() -> None:
    source = (
        "from __future__ import annotations\n"
        "import os, numpy.linalg\n"
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from kvloom.params import SamplingParams\n"
        "if TYPE_CHECKING:\n"
        "    import pandas\n"
        "else:\n"
        "    import scipy\n"
        "def draw():\n"
        "    from matplotlib.figure import Figure\n"
        "    try:\n"
        "        import jinja2\n"
        "    except ImportError:\n"
        "        pass\n"
    )
    assert third_party_imports(source) == [
        ("numpy.linalg", ()), ("scipy", ()), ("matplotlib.figure", ("Figure",)), ("jinja2", ()),
    ]


def test_every_third_party_import_is_declared(environment: Environment) -> None:
    core = _names(_core_requirements())
    extras = {name: _names(reqs) for name, reqs in _extra_requirements().items()}
    problems = []
    for module, path in source_modules().items():
        extra = extra_of(module, MODULE_EXTRAS)
        where = f"{module} (core)" if extra is None else f"{module} (extra {extra!r})"
        for imported, _ in third_party_imports(path.read_text(encoding="utf-8")):
            top = imported.partition(".")[0]
            if top in RUNTIME_PROVIDED:
                continue
            its_extra = OPTIONAL_IMPORTS.get(module, {}).get(top, extra)
            allowed = core | extras[its_extra] if its_extra else core
            dists = environment.provided_by(imported)
            if not dists:
                problems.append(f"{where} imports {imported}, which no distribution installed here provides")
            elif not dists & allowed:
                declare = "[project] dependencies" if its_extra is None else f"the {its_extra!r} extra (or the core)"
                problems.append(f"{where} imports {imported} from {sorted(dists)}: declare it in {declare}")
    assert not problems, "\n".join(sorted(set(problems)))


# --- the install tests -------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> str:
    """``cmd``'s stdout; fails the test, with both outputs, when it exits non-zero."""
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} -> {result.returncode}\n{result.stdout}{result.stderr}"
    return result.stdout


def _virtualenv(path: Path) -> Path:
    """A virtualenv without pip (pip runs from here: ``pip --python``); returns its site-packages."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], path.parent)
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    return Path(_run([str(path / "bin" / "python"), "-I", "-c", code], path).strip())


def _pip(venv: Path, *args: str) -> str:
    return _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), *args], venv, timeout=600)


def _check(venv: Path, extra: str | None) -> dict[str, list[str]]:
    """tests/install_check.py's report from ``venv``'s interpreter, isolated (``-I``: no PYTHONPATH,
    no user site, not the script's directory) and run outside the checkout."""
    config = {"extra": extra, "module_extras": MODULE_EXTRAS, "runtime_provided": sorted(RUNTIME_PROVIDED),
              "optional_imports": {module: sorted(tops) for module, tops in OPTIONAL_IMPORTS.items()}}
    report: dict[str, list[str]] = json.loads(
        _run([str(venv / "bin" / "python"), "-I", str(CHECK_SCRIPT), json.dumps(config)], venv))
    return report


@pytest.fixture(scope="module")
def kvloom_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kvloom's wheel, built by pip from a copy of this checkout's files (tracked, and untracked but
    not ignored: a clone plus the work in progress), so the build writes nothing here."""
    tree = tmp_path_factory.mktemp("checkout")
    for name in filter(None, _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                  ROOT).split("\0")):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(tree)], out, timeout=600)
    (wheel,) = out.glob("kvloom-*.whl")
    return wheel


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory, environment: Environment, kvloom_wheel: Path) -> Path:
    """``pip install kvloom``: the core requirements' closure, and kvloom's wheel installed by pip."""
    venv = tmp_path_factory.mktemp("base") / "venv"
    environment.link(environment.closure(_core_requirements()), _virtualenv(venv))
    _pip(venv, "install", "-q", "--no-deps", "--no-index", str(kvloom_wheel))
    _pip(venv, "check")
    return venv


@pytest.mark.slow
def test_a_plain_install_imports_every_core_module(base_venv: Path, tmp_path: Path) -> None:
    """``pip install kvloom`` with no extra: every module imports (those of an extra may only fail
    with an ImportError naming it), so does every third-party module they import, and the
    installed package is this checkout's (every module, the C kernels' sources, the console script)."""
    report = _check(base_venv, None)
    assert not report["failures"], "\n".join(report["failures"])
    assert report["modules"] == sorted(source_modules())
    installed = next(base_venv.glob("lib/python*/site-packages/kvloom"))
    csrc = sorted(p.name for p in (ROOT / "kernels" / "csrc").iterdir() if p.suffix in (".c", ".h"))
    assert sorted(p.name for p in (installed / "kernels" / "csrc").iterdir()) == csrc
    assert "usage: kvloom" in _run([str(base_venv / "bin" / "kvloom"), "--help"], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("extra", _extras_for_modules())
def test_each_extra_alone_imports_its_modules(
    environment: Environment, base_venv: Path, tmp_path: Path, extra: str,
) -> None:
    """``pip install 'kvloom[EXTRA]'``: that extra's modules all import, and so does every
    third-party module they import (also the lazy ones, e.g. matplotlib for bench)."""
    venv = tmp_path / "venv"
    site_packages = _virtualenv(venv)
    (site_packages / "kvloom-base.pth").write_text(f"{next(base_venv.glob('lib/python*/site-packages'))}\n")
    core = environment.closure(_core_requirements())
    environment.link(environment.closure(_core_requirements() + _extra_requirements()[extra]) - core, site_packages)
    _pip(venv, "check")
    report = _check(venv, extra)
    assert not report["failures"], "\n".join(report["failures"])
    assert any(extra_of(m, MODULE_EXTRAS) == extra for m in report["modules"])
