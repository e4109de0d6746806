"""The package's imports point down: each sub-package imports only the layers below it, and
examples, benchmarks and tests import the package, never each other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "torchrl_r2vpo"

# each part of the package and the parts it may import (besides itself); a part imports
# what is listed, and what those import, never the other way round
LAYERS = {
    "_compat": set(),
    "_deprecation": set(),
    "modules": set(),
    "data": {"_compat"},
    "objectives": {"_compat", "data", "modules"},
    "collectors": {"data"},
    "math_task": {"collectors", "data"},
    "envs": {"_compat", "data", "math_task"},
    "record": {"envs"},
    "recipes": {"_compat", "collectors", "data", "envs", "math_task", "modules", "objectives",
                "record"},
}
# what every part may import: the aliases of names that moved
EVERYWHERE = {"_deprecation"}


def _imported_modules(path: Path) -> list[str]:
    """The absolute module names a file imports, wherever in the file (lazy imports too);
    imports inside docstrings (doctests) are text, not imports."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import; import torchrl_r2vpo.<part> instead")
            names.append(node.module or "")
    return names


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "torchrl_r2vpo" or len(parts) == 1:
        return None
    return parts[1]


def _package_files():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield rel.parts[0].removesuffix(".py"), path


def test_every_part_of_the_package_has_a_layer():
    parts = {part for part, path in _package_files() if path.name != "__init__.py" or
             len(path.relative_to(PACKAGE).parts) > 1}
    assert parts <= set(LAYERS), f"add {sorted(parts - set(LAYERS))} to LAYERS"


@pytest.mark.parametrize("part", sorted(LAYERS))
def test_a_part_imports_only_the_layers_below_it(part):
    forbidden = []
    for owner, path in _package_files():
        if owner != part or path == PACKAGE / "__init__.py":  # the top level re-exports
            continue
        for module in _imported_modules(path):
            target = _part(module)
            if target not in (None, part, *EVERYWHERE, *LAYERS[part]):
                forbidden.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not forbidden, "\n".join(forbidden)


def test_the_layers_form_no_cycle():
    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(dep == goal or (dep not in seen and reaches(dep, goal, seen | {dep}))
                   for dep in LAYERS[start])

    assert not [part for part in LAYERS if reaches(part, part, set())]


@pytest.mark.parametrize("folder", ["examples", "benchmarks", "tests", "tests_vllm"])
def test_scripts_import_the_package_not_each_other(folder):
    local = {path.stem for path in (ROOT / "examples").glob("*.py")}
    local |= {path.stem for path in (ROOT / "benchmarks").glob("*.py")}
    problems = []
    for path in sorted((ROOT / folder).glob("*.py")):
        text = path.read_text()
        if re.search(r"sys\.path\.(insert|append)\(", text):
            problems.append(f"{path.relative_to(ROOT)} changes sys.path")
        for module in _imported_modules(path):
            if module.split(".")[0] in local:
                problems.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not problems, "\n".join(problems)
