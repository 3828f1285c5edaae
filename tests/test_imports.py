"""The repository's modules import each other in one direction: no circles, counting imports inside functions.

An import inside a function hides a circle from Python (the module is complete by the time the function runs) but
not from a reader: two modules that need each other are one module in two files, and which one loads first
decides what works. The graph is read from the source with `ast` (nothing is imported), so this test is cheap.

How a name resolves is how Python resolves it for these files: `plumbing.x` from the repository root; a bare
`import run` in experiments/ or benchmarks/ to the file beside it (a script's own directory comes first on
sys.path), else a top-level module of the root (betadpo, variants, ...). Modules are named by their files.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def repository_modules(root: Path = ROOT) -> dict[str, Path]:
    """{import name: file} of every Python file outside tests/. A package's modules (a directory with an
    __init__.py, like plumbing/) and the root's files by their dotted name (`plumbing.models`, `betadpo`); a script
    directory's files (experiments/, benchmarks/) by their path without .py, since two such directories may both
    hold a `run`."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] in ("tests", "runs") or any(part.startswith(".") for part in relative.parts):
            continue
        if len(relative.parts) == 1 or (root / relative.parts[0] / "__init__.py").is_file():
            name = ".".join(relative.with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
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
    """{file: the repository's files it imports}, as paths relative to the root (plumbing/models.py)."""
    modules = repository_modules(root)
    graph = {}
    for name, path in modules.items():
        beside = path.parent.relative_to(root).as_posix()
        targets = set()
        for imported in imported_names(ast.parse(path.read_text(), filename=str(path))):
            local = f"{beside}/{imported}" if beside != "." and "." not in imported else None
            target = modules.get(local) or modules.get(imported)
            if target is not None:
                targets.add(target.relative_to(root).as_posix())
        graph[path.relative_to(root).as_posix()] = targets - {path.relative_to(root).as_posix()}
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
    assert {"betadpo.py", "sft.py", "eval.py", "plumbing/models.py", "plumbing/errors.py", "experiments/run.py"} <= set(graph)
    assert "plumbing/models.py" in graph["betadpo.py"]  # a top-level import
    assert "plumbing/config.py" in graph["plumbing/metrics.py"]
    assert "plumbing/run_lock.py" in graph["plumbing/stopping.py"]  # `from plumbing import run_lock`
    assert "experiments/stats.py" in graph["experiments/real_report.py"]  # `import stats`, the file beside it
    assert "plumbing/errors.py" in graph["experiments/lower_cache.py"]


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_check_finds_a_circle_hidden_in_a_function(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg/__init__.py").write_text("")
    (tmp_path / "pkg/a.py").write_text("from pkg.b import f\n")
    (tmp_path / "pkg/b.py").write_text("def f():\n    from pkg import c\n")
    (tmp_path / "pkg/c.py").write_text("import pkg.a\n")
    (tmp_path / "pkg/d.py").write_text("from pkg import a\n")  # imports the circle, is not in it
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts/run.py").write_text("def main():\n    import report\n")
    (tmp_path / "scripts/report.py").write_text("import run\n")
    (tmp_path / "run.py").write_text("import pkg.d\n")  # a top-level `run` too: scripts/report's `run` is its neighbour
    assert cycles(import_graph(tmp_path)) == [["pkg/a.py", "pkg/b.py", "pkg/c.py"], ["scripts/report.py", "scripts/run.py"]]
