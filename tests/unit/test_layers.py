"""The package's imports run downward only, with no cycle (ARCHITECTURE.md, "Layer order").

Every ``import`` of an ``internvl_runtime`` module, at module level or inside a function, is read with ast
and checked against the layer order below (the one ARCHITECTURE.md draws): a module may import its own
layer or a lower one, and no chain of imports between modules comes back to where it started."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "internvl_runtime"

#: Lowest first. A module belongs to the first entry that is its dotted name or a prefix of it.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "version", "hardware", "config", "hub", "testing"),
    ("weights", "processing", "kernels", "vl"),
    ("models", "quantization"),
    ("compute_plan", "decode_stack", "placement"),
    ("loading",),
    ("engine",),
    ("distributed",),
    ("api",),
    ("serving",),
    ("cli", "__main__", "__init__"),
]


def layer_of(module: str) -> int:
    name = module.removeprefix("internvl_runtime").lstrip(".") or "__init__"
    for index, names in enumerate(LAYERS):
        if any(name == n or name.startswith(n + ".") for n in names):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and ARCHITECTURE.md")


def is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported internvl_runtime module, line) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("internvl_runtime")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("internvl_runtime"):
                continue
            # "from pkg import name": the submodule pkg.name if there is one, else pkg itself
            found += [(f"{target}.{a.name}" if is_module(f"{target}.{a.name}") else target, node.lineno)
                      for a in node.names]
    return found


def sources() -> list[Path]:
    paths = sorted(PACKAGE.rglob("*.py"))
    assert len(paths) > 50, f"the package's sources were not found under {PACKAGE}"
    return paths


def test_imports_only_run_downward():
    upward = []
    for path in sources():
        here = module_name(path)
        for target, line in imports(path):
            if target == "internvl_runtime" and here != "internvl_runtime":
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports the package root")
                continue
            if layer_of(target) > layer_of(here):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} (layer {layer_of(target)}) "
                              f"from layer {layer_of(here)}")
    assert not upward, "imports that run back up the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for path in sources():
        graph.setdefault(module_name(path), set()).update(t for t, _ in imports(path))
    modules = set(graph)
    edges = {m: (targets & modules) - {m} for m, targets in graph.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt):], node, nxt]) if nxt in stack
                              else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
