"""pyproject.toml declares every third-party package that the code imports."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _name(requirement: str) -> str:
    """Canonical distribution name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement)[0]).lower()


def _imported_distributions(folder: Path) -> dict[str, str]:
    """{distribution: a file importing it} over every import (also inside functions)."""
    dists = importlib.metadata.packages_distributions()
    found = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in ("sqjax", "tests"):
                    continue
                for dist in dists.get(top, [top]):
                    found.setdefault(_name(dist), str(path.relative_to(ROOT)))
    return found


# Imported only when present, never installed by pyproject.toml: PyTorch reads .pt
# checkpoints in sqjax/wespeaker.py (an unpinned torch would pull a CUDA build of GBs).
OPTIONAL = {"torch"}


@pytest.mark.parametrize(
    "folder, extras",
    [("sqjax", ("onnx",)), ("bench", ("bench", "onnx")), ("tests", ("test",))],
)
def test_imports_are_declared(folder, extras):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    for extra in extras:
        declared |= {_name(r) for r in project["optional-dependencies"][extra]}
    found = _imported_distributions(ROOT / folder)
    missing = {d: f for d, f in found.items() if d not in declared | OPTIONAL}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
