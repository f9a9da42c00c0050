"""Layers that import downward only: records at the bottom, components above them, the recipe on top.

Every import of every finetune module counts, at module level and inside functions alike (only imports under
`if TYPE_CHECKING:`, which never run, are left out). A module may import its own layer or a lower one, never a
higher one, and no chain of imports may lead back to where it started.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "finetune"

# Lowest first. A module belongs to the first layer one of whose prefixes it starts with; every other module is a
# component. The records: the config schema and parsing, errors, and the declarations the rest asks (plugins'
# options, refusals, plans and placements; methods; architectures; tasks; model sources).
RECORDS = (
    "finetune.core", "finetune.errors", "finetune.config", "finetune.methods", "finetune.architectures", "finetune.tasks", "finetune.sources",
)  # fmt: skip
RECIPE = ("finetune.train", "finetune.run", "finetune.launch")
LAYERS = ("records", "components", "recipe")
HEAVY = ("torch", "colossalai")  # what the records never import: config validation fails in a second

# (importer, imported): the only imports allowed to break the rules, each with its reason.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    if any(module == p or module.startswith(p + ".") for p in RECORDS):
        return "records"
    if any(module == p or module.startswith(p + ".") for p in RECIPE):
        return "recipe"
    return "components"


def imported(module: str) -> dict[str, int]:
    """{imported module: line} of every import that runs in `module` (finetune modules by their own name, others by their top package)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    never = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If) and ast.unparse(branch.test) == "TYPE_CHECKING" for node in ast.walk(branch)}
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if id(node) in never:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            target = name if name in MODULES else name.split(".")[0]
            if target != module:
                found.setdefault(target, node.lineno)
    return found


IMPORTS = {module: imported(module) for module in MODULES}
EDGES = {module: {target: line for target, line in targets.items() if target in MODULES} for module, targets in IMPORTS.items()}


def test_every_import_points_downward():
    upward = [
        f"{module} ({layer(module)}) imports {target} ({layer(target)}) at line {line}"
        for module, targets in EDGES.items()
        for target, line in targets.items()
        if LAYERS.index(layer(target)) > LAYERS.index(layer(module)) and (module, target) not in EXCEPTIONS
    ]
    assert not upward, "\n".join(upward)


def test_the_records_import_no_torch_or_colossalai():
    heavy = [f"{module} imports {target} at line {line}" for module, targets in IMPORTS.items() if layer(module) == "records" for target, line in targets.items() if target in HEAVY]
    assert not heavy, "\n".join(heavy)


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a set of modules importing one another."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in edges[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in edges:
        if module not in index:
            visit(module)
    return found


def test_no_import_circle():
    edges = {module: {t: line for t, line in targets.items() if (module, t) not in EXCEPTIONS} for module, targets in EDGES.items()}
    circles = cycles(edges)
    assert not circles, "\n".join(" <-> ".join(c) + ": " + "; ".join(f"{m} -> {t} (line {line})" for m in c for t, line in edges[m].items() if t in c) for c in circles)


def test_the_scan_sees_function_level_imports_and_circles():
    """The scan itself: an import inside a function counts, one under TYPE_CHECKING does not, and a circle is found."""
    assert "finetune.evaluation" in EDGES["finetune.outputs"]  # imported inside outputs' functions only
    assert "finetune.run" not in EDGES["finetune.outputs"]  # only for type hints
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_exceptions_are_few_and_still_needed():
    assert len(EXCEPTIONS) <= 3
    for (module, target), reason in EXCEPTIONS.items():
        assert reason and target in EDGES[module], f"{module} -> {target} no longer needs its exception"


def test_report_the_figures(capsys):
    """Not a check: the module count, the biggest modules and the import edges, for the record (pytest -s shows them)."""
    sizes = sorted(((len(path.read_text().splitlines()), name) for name, path in MODULES.items()), reverse=True)
    with capsys.disabled():
        print(f"\n{len(MODULES)} modules, {sum(len(t) for t in EDGES.values())} import edges between them; biggest: " + ", ".join(f"{n} {s}" for s, n in sizes[:6]))
