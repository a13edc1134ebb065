"""The package's import direction: entry -> training/generation/evaluation -> data/export -> model/vq, no cycles.

Every import counts, also the ones inside functions (a lazy import is still a dependency).
"""

import ast
from pathlib import Path

import chameleon_ft

PACKAGE = Path(chameleon_ft.__file__).resolve().parent

# Lower number = lower layer. A module may import from its own layer or below, never above.
LAYERS = [
    (0, ("errors", "paths", "registry", "model", "vq", "adapter", "evaluation.metrics", "evaluation.coco_tokenizer",
         "evaluation.ptb_tokenizer")),
    (1, ("data", "tasks", "export", "tiny")),
    (2, ("training", "generation", "evaluation")),
    (3, ("cli", "config", "__main__", "pretokenize", "evaluate", "generate", "merge")),
]


def layer_of(module: str) -> int:
    if module == "chameleon_ft":
        return 0  # the package itself only holds the version
    rel = module.removeprefix("chameleon_ft.")
    if rel.endswith("__main__"):
        return 3  # every "python -m" entry is an entry point
    best = None
    for level, prefixes in LAYERS:
        for p in prefixes:
            if (rel == p or rel.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (level, p)
    assert best is not None, f"{module} is in no layer; add it to LAYERS"
    return best[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "chameleon_ft" or m.startswith("chameleon_ft.")}


def graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in PACKAGE.rglob("*.py") if "conf" not in p.parts and "recipes" not in p.parts}
    return {m: {i for i in imports_of(p) if i != m} for m, p in mods.items()}


def test_imports_go_down_the_layers():
    upward = [f"{m} (layer {layer_of(m)}) imports {i} (layer {layer_of(i)})"
              for m, deps in graph().items() for i in deps
              if i != "chameleon_ft" and layer_of(i) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    # A package imports what its __init__ re-exports; a submodule importing its own package is not a cycle.
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in g.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in edges.get(m, ()):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d in edges and state.get(d) is None:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if state.get(m) is None:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
