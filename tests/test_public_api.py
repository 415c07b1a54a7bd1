"""geomed's consumers — the MONAI adapters, the 3D Slicer extension, benchmarks, tutorials and tools — stand on its
public API only, so that geomed can change inside without breaking them. (geomed's own tests may test its private
helpers.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSUMERS = ("monai_losses", "slicer_extension", "benchmarks", "tutorials", "tools")


def _private_geomed_imports(source: str) -> list[str]:
    """The private geomed names a module imports: a ``geomed`` module path with a component starting with ``_``, or
    a name starting with ``_`` taken from a geomed module (dunders such as ``__version__`` are public; relative
    imports are the consumer's own)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
            names: list[str] = []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules, names = [node.module], [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] != "geomed":
                continue
            private = [part for part in parts + names if part.startswith("_") and not part.endswith("__")]
            if private:
                found.append(f"line {node.lineno}: {module} {private}")
    return found


def test_the_check_finds_private_imports():
    assert _private_geomed_imports("from geomed._vtk import mesh_to_polydata") == ["line 1: geomed._vtk ['_vtk']"]
    assert _private_geomed_imports("import geomed._files as f\nfrom geomed.ot.grid import _support")
    assert not _private_geomed_imports("from geomed.io import file_stem\nfrom ._conventions import _plain\n"
                                       "import geomed\nfrom geomed import __version__, keops_available")


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_consumers_import_no_private_geomed_name(consumer):
    offenders = {str(path.relative_to(ROOT)): found for path in sorted((ROOT / consumer).rglob("*.py"))
                 if (found := _private_geomed_imports(path.read_text(encoding="utf-8")))}
    assert not offenders, f"private geomed names imported outside geomed/: {offenders}"
