"""The package's import graph, read from the source with ast (every import statement, at module level and inside
functions): it has no cycle, code outside hass_ext/train/ never imports hass_ext.train, and an import inside a
function is there only to save start-up time, which its line says with a ``start-up`` comment."""
import ast
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest

PACKAGE = "hass_ext"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
EXTENSIONS = {"hass_ext._C"}  # compiled modules: no source to read, and they import nothing of the package
RESTRUCTURE = ("the inference flow (generate/speculative/tree_choice/checkpoint/draft/cli) still has import cycles, "
               "imports inside functions and imports of hass_ext.train")


class Import(NamedTuple):
    source: str        # the importing module
    target: str        # the imported module of the package
    line: int
    in_function: bool
    text: str          # the statement's source lines


def module_names() -> Dict[str, Path]:
    """``{dotted module name: path}`` of every .py file of the package (a package is its __init__.py)."""
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known) -> List[Import]:
    """The package modules that ``module`` imports, one entry per imported module and statement.

    ``from P import name`` imports the module P.name when there is one, else (a name defined in P) P itself."""
    source = path.read_text()
    lines = source.splitlines()
    is_package = path.name == "__init__.py"
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                else:
                    base = _resolve_from(child, module, is_package)
                    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
                text = "\n".join(lines[child.lineno - 1:child.end_lineno])
                for t in dict.fromkeys(targets):
                    found.append(Import(module, t, child.lineno, in_function, text))
            visit(child, inner)

    visit(ast.parse(source, str(path)), False)
    return found


def package_imports() -> List[Import]:
    mods = module_names()
    known = set(mods) | EXTENSIONS
    every = [imp for name, path in mods.items() for imp in imports_of(name, path, known)]
    return every


def graph(imports: List[Import]) -> Dict[str, set]:
    edges: Dict[str, set] = {}
    for imp in imports:
        if imp.target == PACKAGE or imp.target.startswith(PACKAGE + "."):
            edges.setdefault(imp.source, set()).add(imp.target)
    return edges


def find_cycles(edges: Dict[str, set]) -> List[List[str]]:
    """One cycle (a list of nodes, first == last) per strongly connected component that has one (Tarjan)."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                comps.append(set(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            strongconnect(v)
    return [_cycle_in(comp, edges) for comp in comps]


def _cycle_in(comp: set, edges) -> List[str]:
    """A cycle through the smallest node of a strongly connected component (breadth-first: a shortest one)."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, ())):
                if w == start:
                    return paths[v] + [start]
                if w in comp and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")  # cannot happen in a component


def _where(imports: List[Import], cycle: List[str]) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        imp = next(i for i in imports if i.source == a and i.target == b)
        steps.append(f"  {a}:{imp.line}{' (in a function)' if imp.in_function else ''}: {imp.text.strip()}")
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


# ---- the cycle finder itself -------------------------------------------------------------------------------

def test_find_cycles_on_small_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"x": {"x"}}) == [["x", "x"]]
    two = find_cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"e"}, "e": {"c"}})
    assert sorted(two) == [["a", "b", "a"], ["c", "d", "e", "c"]]
    # a shortest cycle is reported even where a longer one exists through the same node
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": {"a"}}) == [["a", "c", "a"]]


def test_imports_are_resolved(tmp_path):
    pkg = tmp_path / "hass_ext"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\nfrom . import b, VERSION\n")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from .sub import g  # start-up\n    import hass_ext.b\n")
    (pkg / "b.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from ..a import f\nfrom .. import b\nfrom . import c\n")
    (pkg / "sub" / "c.py").write_text("from hass_ext.sub import c\n")
    known = {"hass_ext", "hass_ext.a", "hass_ext.b", "hass_ext.sub", "hass_ext.sub.c"}
    files = {"hass_ext": pkg / "__init__.py", "hass_ext.a": pkg / "a.py", "hass_ext.sub": pkg / "sub" / "__init__.py",
             "hass_ext.sub.c": pkg / "sub" / "c.py"}
    imports = [i for name, path in files.items() for i in imports_of(name, path, known)]
    assert {(i.source, i.target, i.in_function) for i in imports} == {
        ("hass_ext", "hass_ext.a", False), ("hass_ext", "hass_ext.b", False),
        ("hass_ext", "hass_ext", False),  # VERSION: a name of the package itself
        ("hass_ext.a", "os", False), ("hass_ext.a", "hass_ext.sub", True), ("hass_ext.a", "hass_ext.b", True),
        ("hass_ext.sub", "hass_ext.a", False), ("hass_ext.sub", "hass_ext.b", False),
        ("hass_ext.sub", "hass_ext.sub.c", False), ("hass_ext.sub.c", "hass_ext.sub.c", False)}
    assert sorted(find_cycles(graph(imports))) == [
        ["hass_ext", "hass_ext"], ["hass_ext.a", "hass_ext.sub", "hass_ext.a"], ["hass_ext.sub.c", "hass_ext.sub.c"]]
    problems = _problems(imports)
    assert "hass_ext.a:5 imports inside a function without a start-up reason: import hass_ext.b" in problems
    assert not any(p.startswith("hass_ext.a:4") for p in problems)  # the start-up comment allows it


# ---- the package -------------------------------------------------------------------------------------------

def _problems(imports: List[Import], modules=None) -> List[str]:
    mine = [i for i in imports if modules is None or i.source in modules]
    problems = [f"import cycle {_where(imports, c)}" for c in find_cycles(graph(mine))]
    for imp in mine:
        # the command line hosts the training subcommands: it alone may reach the training package
        inside_train = imp.source in (f"{PACKAGE}.train", f"{PACKAGE}.cli") or imp.source.startswith(f"{PACKAGE}.train.")
        if not inside_train and (imp.target == f"{PACKAGE}.train" or imp.target.startswith(f"{PACKAGE}.train.")):
            problems.append(f"{imp.source}:{imp.line} imports training code: {imp.text.strip()}")
        if imp.in_function and not any("start-up" in line.partition("#")[2] for line in imp.text.splitlines()):
            problems.append(f"{imp.source}:{imp.line} imports inside a function without a start-up reason: "
                            f"{imp.text.strip()}")
    return sorted(set(problems))


def test_the_kernel_layer_is_clean():
    # the op wrappers and what they use: no cycle, no stray import inside a function
    imports = package_imports()
    layer = {m for m in module_names() if m.startswith(f"{PACKAGE}.ops")} | {
        f"{PACKAGE}.{m}" for m in ("_library", "sampling", "oracles", "hf_attention", "speed_eval", "atomic_io")}
    problems = _problems(imports, layer)
    assert not problems, "\n".join(problems)


def test_package_import_graph():
    problems = _problems(package_imports())
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)
