"""The repository's modules import each other in one direction: no circles, counting imports inside functions.

An import inside a function hides a circle from Python (the module is complete by the time the function runs) but
not from a reader: two modules that need each other are one module in two files, and which one loads first
decides what works. The graph is read from the source with `ast` (nothing is imported), so this test is cheap.

How a name resolves is how Python resolves it for these files: `plumbing.x` from the repository root; a bare
`import run` in experiments/ or benchmarks/ to the file beside it (a script's own directory comes first on
sys.path), else a top-level module of the root (betadpo, variants, ...).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def repository_modules(root: Path = ROOT) -> dict[str, Path]:
    """{module name: file} of every Python file outside tests/: `plumbing.models`, `betadpo`, `experiments/run`
    (a script directory's files are named by their path: two directories may both have a `run`)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] in ("tests", "runs") or any(part.startswith(".") for part in relative.parts):
            continue
        if relative.parts[0] == "plumbing":
            name = ".".join(relative.with_suffix("").parts)
            found["plumbing" if name == "plumbing.__init__" else name] = path
        elif len(relative.parts) == 1:
            found[relative.stem] = path
        else:
            found[relative.with_suffix("").as_posix()] = path
    return found


def imported_names(tree: ast.AST) -> set[str]:
    """Every module name an `import` / `from ... import` anywhere in the tree may load (top level and inside
    functions alike); for `from a import b`, both `a` and `a.b` (b may be a submodule)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the repository modules it imports}."""
    modules = repository_modules(root)
    graph = {}
    for name, path in modules.items():
        beside = path.parent.relative_to(root).as_posix()
        targets = set()
        for imported in imported_names(ast.parse(path.read_text(), filename=str(path))):
            local = f"{beside}/{imported}" if beside != "." and "." not in imported else None
            if local in modules:
                targets.add(local)
            elif imported in modules:
                targets.add(imported)
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm), each sorted: every
    circle of imports lies inside one of them."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def test_the_graph_sees_the_repository():
    graph = import_graph()
    assert {"betadpo", "sft", "eval", "plumbing.models", "plumbing.errors", "experiments/run"} <= set(graph)
    assert "plumbing.models" in graph["betadpo"]  # a top-level import
    assert "plumbing.config" in graph["plumbing.metrics"]
    assert "experiments/run" in graph["experiments/real_report"]  # `import run` beside it


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_check_finds_a_circle_hidden_in_a_function(tmp_path):
    (tmp_path / "plumbing").mkdir()
    (tmp_path / "plumbing/__init__.py").write_text("")
    (tmp_path / "plumbing/a.py").write_text("from plumbing.b import f\n")
    (tmp_path / "plumbing/b.py").write_text("def f():\n    from plumbing import c\n")
    (tmp_path / "plumbing/c.py").write_text("import plumbing.a\n")
    (tmp_path / "plumbing/d.py").write_text("from plumbing import a\n")  # imports the circle, is not in it
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts/run.py").write_text("def main():\n    import report\n")
    (tmp_path / "scripts/report.py").write_text("import run\n")
    assert cycles(import_graph(tmp_path)) == [["plumbing.a", "plumbing.b", "plumbing.c"], ["scripts/report", "scripts/run"]]
