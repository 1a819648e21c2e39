"""The package's import graph (imports at module level and inside functions alike) has no cycle, and the
inference modules never reach the training package."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFERENCE = ("hass_ext.generate", "hass_ext.speculative", "hass_ext.tree_choice", "hass_ext.tree",
             "hass_ext.draft_io", "hass_ext.draft", "hass_ext.target", "hass_ext.calibration", "hass_ext.timing")


def import_graph() -> dict:
    """{module: modules of the package it imports} from the source, relative and absolute imports."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "hass_ext")):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                modules[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                where = (base + ("." + node.module if node.module else "")) if node.level else node.module
                for alias in node.names:
                    if where + "." + alias.name in modules:
                        deps.add(where + "." + alias.name)
                    elif node.module and where in modules:
                        deps.add(where)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
        deps.discard(name)
        graph[name] = deps
    return graph


def test_no_import_cycle():
    graph = import_graph()
    assert "hass_ext.speculative" in graph and graph["hass_ext.generate"]
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_inference_does_not_import_training():
    graph = import_graph()
    for module in INFERENCE:
        seen, todo = set(), [module]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph.get(m, ()))
        assert not [m for m in seen if m.startswith("hass_ext.train")], module
