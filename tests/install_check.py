"""Run by an interpreter that has kvloom installed (``python -I install_check.py CONFIG``): import the
installed package's modules and the third-party modules they import, and report what failed as JSON.

Standard library only: it runs in the throwaway virtualenvs of tests/test_install.py, which hold
kvloom's declared dependencies and nothing else. tests/test_install.py also reuses its AST helpers.

CONFIG is a JSON object:

- ``module_extras``: ``{module prefix: extra}``, the modules that need an extra (a prefix covers the
  module of that name and everything below it).
- ``extra``: None to check the modules that need no extra (the core), or the name of the one extra
  whose modules are checked.
- ``runtime_provided``: top-level names of third-party modules that are imported only when the
  caller's own code has already imported them (e.g. trio, only while trio runs the engine).
- ``optional_imports``: ``{module: [top-level names]}``, what a module imports only for a feature of
  another extra (and then fails naming it): not checked here, the other extra's own modules are.

Output (stdout, one JSON object): ``modules``, every module of the installed package (found on disk,
without importing), and ``failures``, one line per import that failed. With ``extra`` None, a module
that needs an extra may fail to import, but only with an ImportError that names the extra
(``kvloom[NAME]``); every module that needs none must import, and so must every third-party module
it imports anywhere (also inside functions: the lazy imports), and every name in ``kvloom.__all__``
must resolve. With ``extra`` set, the same holds for that extra's modules, which must all import.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import pkgutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

PACKAGE = "kvloom"
NOT_IMPORTED = frozenset({"kvloom.__main__"})
"""Modules listed but never imported: importing ``kvloom.__main__`` runs the command line."""


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def third_party_imports(source: str, first_party: str = PACKAGE) -> list[tuple[str, tuple[str, ...]]]:
    """Every absolute import in ``source`` that runs at some point (module level or inside a
    function; not under ``if TYPE_CHECKING:``), as ``(module, names)``: ``import a.b`` gives
    ``("a.b", ())``, ``from a.b import c, d`` gives ``("a.b", ("c", "d"))``. The standard library,
    ``__future__`` and ``first_party`` are left out; relative imports are first-party."""
    found: list[tuple[str, tuple[str, ...]]] = []

    def third_party(module: str) -> bool:
        top = module.partition(".")[0]
        return top not in sys.stdlib_module_names and top not in {"__future__", first_party}

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, ()) for alias in node.names if third_party(alias.name))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and third_party(node.module):
            found.append((node.module, tuple(alias.name for alias in node.names)))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def extra_of(module: str, module_extras: Mapping[str, str]) -> str | None:
    """The extra ``module`` needs: that of the longest prefix in ``module_extras`` covering it."""
    covering = [prefix for prefix in module_extras if module == prefix or module.startswith(prefix + ".")]
    return module_extras[max(covering, key=len)] if covering else None


def installed_modules(package: str = PACKAGE) -> dict[str, Path]:
    """``{module name: source file}`` for ``package`` and every module below it, found on disk
    (nothing is imported)."""
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin is not None and spec.submodule_search_locations is not None, package
    modules = {package: Path(spec.origin)}

    def walk(directories: Sequence[str], prefix: str) -> Iterator[tuple[str, Path]]:
        for info in pkgutil.iter_modules(directories, prefix + "."):
            leaf = info.name.rpartition(".")[2]
            base = Path(getattr(info.module_finder, "path", ""))
            if info.ispkg:
                yield info.name, base / leaf / "__init__.py"
                yield from walk([str(base / leaf)], info.name)
            else:
                yield info.name, base / f"{leaf}.py"

    modules.update(walk(list(spec.submodule_search_locations), package))
    return modules


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _import_third_party(module: str, names: tuple[str, ...]) -> None:
    """What ``import module`` / ``from module import names`` does (a name may be a submodule)."""
    imported = importlib.import_module(module)
    for name in names:
        if name != "*" and not hasattr(imported, name):
            importlib.import_module(f"{module}.{name}")


def check(
    extra: str | None, module_extras: Mapping[str, str], runtime_provided: frozenset[str],
    optional_imports: Mapping[str, Sequence[str]],
) -> list[str]:
    """The failures (see the module docstring); empty when the install is sound."""
    failures: list[str] = []
    for module, path in sorted(installed_modules().items()):
        needs = extra_of(module, module_extras)
        if module in NOT_IMPORTED or (extra is not None and needs != extra):
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:
            if extra is None and needs is not None and isinstance(exc, ImportError) and f"kvloom[{needs}]" in str(exc):
                continue  # a module of an extra that is not installed, saying which one to install
            failures.append(f"import {module}: {_describe(exc)}")
            continue
        if extra is None and needs is not None:
            continue  # importable without its extra; its own imports are checked with the extra
        for imported, names in third_party_imports(path.read_text(encoding="utf-8")):
            top = imported.partition(".")[0]
            if top in runtime_provided or top in optional_imports.get(module, ()):
                continue
            try:
                _import_third_party(imported, names)
            except Exception as exc:
                failures.append(f"{module} imports {imported}: {_describe(exc)}")
    if extra is None:
        package = importlib.import_module(PACKAGE)
        for name in package.__all__:
            try:
                getattr(package, name)
            except Exception as exc:
                failures.append(f"from {PACKAGE} import {name}: {_describe(exc)}")
    return failures


def main(argv: Sequence[str]) -> int:
    config = json.loads(argv[1])
    failures = check(config["extra"], config["module_extras"], frozenset(config["runtime_provided"]),
                     config["optional_imports"])
    print(json.dumps({"modules": sorted(installed_modules()), "failures": failures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
