"""The import layers, read from the source: `.importlinter`'s contracts hold, and no module of
`hvd_easgd` or `benchmarks` is part of an import cycle.

`lint-imports` checks the contracts (optim below train below benchmarks; the library imports
neither benchmarks nor tests; no cycle between sibling modules or packages). Its acyclic-siblings
contract does not see a cycle that runs through a package's `__init__` (a parent is not a sibling
of its children), so the module graph is also searched here for strongly connected components.
Imports inside functions count: grimp reads every import statement, wherever it stands.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Set

import pytest

from tests.hvdrun import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CYCLE_FREE_PACKAGES = ("hvd_easgd", "benchmarks")


def test_import_contracts_hold():
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the test extra (pip install -e '.[test]')")
    proc = subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=str(REPO),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"lint-imports found broken contracts:\n{proc.stdout}{proc.stderr}"


class ImportCycles:
    """Import cycles among the modules under one package: Tarjan's strongly connected components
    of the directed graph `module -> modules it imports`, restricted to that package."""

    def __init__(self, graph, package: str) -> None:
        self._graph = graph
        self._modules = {m for m in graph.modules if m == package or m.startswith(package + ".")}
        self._index: Dict[str, int] = {}
        self._low: Dict[str, int] = {}
        self._stack: List[str] = []
        self._on_stack: Set[str] = set()
        self._cycles: List[List[str]] = []

    def find(self) -> List[List[str]]:
        """Each cycle as the sorted list of its modules (components of one module that imports
        itself do not occur in grimp's graph)."""
        for module in sorted(self._modules):
            if module not in self._index:
                self._visit(module)
        return sorted(self._cycles)

    def _imported_by(self, module: str) -> Iterable[str]:
        return sorted(self._graph.find_modules_directly_imported_by(module) & self._modules)

    def _visit(self, module: str) -> None:
        self._index[module] = self._low[module] = len(self._index)
        self._stack.append(module)
        self._on_stack.add(module)
        for imported in self._imported_by(module):
            if imported not in self._index:
                self._visit(imported)
                self._low[module] = min(self._low[module], self._low[imported])
            elif imported in self._on_stack:
                self._low[module] = min(self._low[module], self._index[imported])
        if self._low[module] == self._index[module]:
            self._pop_component(module)

    def _pop_component(self, root: str) -> None:
        component = []
        while True:
            module = self._stack.pop()
            self._on_stack.discard(module)
            component.append(module)
            if module == root:
                break
        if len(component) > 1:
            self._cycles.append(sorted(component))

    def describe(self, cycle: List[str]) -> str:
        """The imports that close the cycle, one per line with its source line."""
        members = set(cycle)
        lines = []
        for importer in cycle:
            for imported in self._imported_by(importer):
                if imported not in members:
                    continue
                for detail in self._graph.get_import_details(importer=importer, imported=imported):
                    lines.append(f"  {importer}:{detail['line_number']}: {detail['line_contents']}")
        return "\n".join(lines)


@pytest.fixture(scope="module")
def import_graph():
    try:
        import grimp
    except ImportError:
        pytest.fail("grimp is missing: install the test extra (pip install -e '.[test]')")
    sys.path.insert(0, str(REPO))  # benchmarks/ is a namespace package found from the repo root
    try:
        return grimp.build_graph(*CYCLE_FREE_PACKAGES, cache_dir=None)
    finally:
        sys.path.remove(str(REPO))


@pytest.mark.parametrize("package", CYCLE_FREE_PACKAGES)
def test_no_import_cycles_among_modules(import_graph, package):
    cycles = ImportCycles(import_graph, package)
    found = cycles.find()
    report = "\n".join(f"cycle {' <-> '.join(c)}:\n{cycles.describe(c)}" for c in found)
    assert not found, f"import cycles in {package} (lazy imports count too):\n{report}"
