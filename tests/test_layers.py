"""The package's layers point one way, and no two files import each other round a circle: this
test reads every import in flexc/**/*.py.

    CLI/API  ->  compiler  ->  passes  ->  ir  ->  kernels
                     \\-> eval -> runtime -> export -/        (beside the passes; they read
                                                            what passes produced, through ir)

Every ``import`` / ``from ... import`` counts, at module level or inside a function (a lazy
import is still a dependency); so does ``importlib.import_module("flexc....")`` with a literal
name. Imports under ``if TYPE_CHECKING:`` do not run and are not counted. The rules are the
table docs/architecture.md draws (checked here), where what each layer holds is explained.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flexc"

# Module (or package prefix) -> layer; the longest matching prefix wins.
LAYERS = {
    "flexc": "api",  # the package itself: flexc.compile, flexc.load
    "flexc.__main__": "api",
    "flexc.cli": "api",
    "flexc.cli_eval": "api",  # the `flexc eval` and `flexc compare` commands
    "flexc.compiler": "compiler",
    "flexc.eval": "eval",
    "flexc.runtime": "runtime",
    "flexc.serving": "serving",  # the vLLM plugin: reads artifacts like the runtime does
    "flexc.export": "export",
    "flexc.passes": "passes",
    "flexc.models": "models",  # resolving and loading the model a spec names
    "flexc.zoo": "models",  # the offline model zoo
    "flexc.data": "data",
    "flexc.ir": "ir",
    "flexc.kernels": "kernels",
    "flexc.errors": "base",
    "flexc.utils": "base",
}

# Layer -> the layers it may import (its own always allowed).
ALLOWED = {
    "api": {"compiler", "eval", "serving", "runtime", "export", "passes", "models", "data", "ir", "kernels", "base"},
    "compiler": {"eval", "runtime", "export", "passes", "models", "data", "ir", "kernels", "base"},
    "eval": {"runtime", "export", "models", "data", "ir", "kernels", "base"},
    "runtime": {"export", "ir", "kernels", "base"},
    "serving": {"runtime", "export", "ir", "kernels", "base"},
    "export": {"ir", "kernels", "base"},
    "passes": {"data", "ir", "kernels", "base"},
    "models": {"data", "ir", "base"},
    "data": {"base"},
    "ir": {"kernels", "base"},
    "kernels": {"base"},
    "base": set(),
}

# (importing module, imported module): allowed for now, with the reason.
EXCEPTIONS: dict[tuple[str, str], str] = {}

# ``from flexc import __version__`` reads the version string only, from any layer.
VERSION_IMPORT = ("flexc", "__version__")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported flexc module, line) for every import in the file, nested ones included."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return imports_in(path.read_text(), package, str(path))


def imports_in(source: str, package: str, filename: str = "<source>") -> list[tuple[str, int]]:
    """(imported flexc module, line) for every import in ``source``, a module of ``package``."""
    tree = ast.parse(source, filename)
    skip = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for alias in node.names:
                if (base, alias.name) == VERSION_IMPORT:
                    continue
                sub = f"{base}.{alias.name}"
                found.append((sub if _is_module(sub) else base, node.lineno))
        elif (isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, node.lineno))
    return [(name, line) for name, line in found if name == "flexc" or name.startswith("flexc.")]


def all_edges() -> list[tuple[str, str, str, int]]:
    """(importer, imported, file, line) across the package."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = module_name(path)
        for dst, line in imports_of(path):
            edges.append((src, dst, str(path.relative_to(PACKAGE.parent)), line))
    return edges


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))  # raises ValueError (max of nothing) for an unplaced module


def test_imports_point_down():
    bad = []
    for src, dst, file, line in all_edges():
        a, b = layer_of(src), layer_of(dst)
        if a == b or b in ALLOWED[a] or (src, dst) in EXCEPTIONS:
            continue
        bad.append(f"{file}:{line}: {src} ({a}) imports {dst} ({b})")
    assert not bad, "imports against the layers (see docs/architecture.md):\n" + "\n".join(bad)


@pytest.mark.parametrize("low, high", [
    ("ir", "passes"), ("ir", "compiler"), ("ir", "export"), ("ir", "runtime"), ("ir", "eval"),
    ("kernels", "ir"), ("kernels", "passes"), ("kernels", "compiler"),
    ("passes", "export"), ("passes", "compiler"), ("export", "passes"), ("export", "compiler"),
    ("runtime", "passes"), ("runtime", "compiler"), ("eval", "passes"), ("eval", "compiler"),
])
def test_the_rules_the_issue_names(low, high):
    assert high not in ALLOWED[low]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_cycles_between_layers():
    assert _cycle(ALLOWED) is None
    actual: dict[str, set[str]] = {}
    for src, dst, _, _ in all_edges():
        a, b = layer_of(src), layer_of(dst)
        if a != b and (src, dst) not in EXCEPTIONS:
            actual.setdefault(a, set()).add(b)
    assert _cycle(actual) is None, _cycle(actual)


def test_no_import_circles_between_files():
    """Within a layer too: a module never reaches itself again through what it imports."""
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in all_edges():
        if src != dst:
            graph.setdefault(src, set()).add(dst)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def documented_rules() -> dict[str, set[str]]:
    """The "layer | may import" table of docs/architecture.md, as layer -> layers."""
    rules = {}
    for line in ARCHITECTURE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("layer", "---") or not line.startswith("|"):
            continue
        layer = cells[0].split(" (")[0]
        may = cells[1]
        rules[layer] = set(ALLOWED) - {layer} if may == "everything" else (
            set() if may == "nothing" else {m.strip() for m in may.split(",")})
    return rules


def test_the_rules_are_the_table_the_architecture_document_draws():
    assert documented_rules() == ALLOWED


def test_the_reader_sees_nested_relative_and_dynamic_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from flexc.compiler.spec import Spec\n"  # not counted: never runs
        "def f():\n"
        "    from flexc import models\n"  # a submodule imported from the package
        "    from ..ir.op import run_experts\n"  # relative
        "    import flexc.kernels.dispatch\n"
        "    importlib.import_module('flexc.export')\n"
        "    from flexc import __version__\n"  # the version string: not a dependency
    )
    found = [name for name, _ in imports_in(source, "flexc.passes")]
    assert found == ["flexc.models", "flexc.ir.op", "flexc.kernels.dispatch", "flexc.export"], found
