"""The package's structure: no module imports another's private names, and module-level imports form no cycle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kcircuits"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kcircuits"):
                bad += [f"{name}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


def test_module_level_imports_have_no_cycle():
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in mods.items():
        deps = set()
        for node in tree.body:  # module level only: imports inside functions are deliberate late imports
            if isinstance(node, ast.ImportFrom):
                target = _resolve(name, node, name + ".__init__" in mods or False)
                if target and target.startswith("kcircuits"):
                    deps.add(target)
                    deps.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("kcircuits"))
        graph[name] = {d for d in deps if d in mods and d != name}
    # a package's __init__ importing its own submodules is how packages are built, not a cycle
    for name in graph:
        graph[name] = {d for d in graph[name] if not (d.startswith(name + ".") and name in mods)}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
