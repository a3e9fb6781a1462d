"""The package layout stays legible: no import cycles, few loose modules, commands stand alone."""

import ast
import pathlib

LM = pathlib.Path(__file__).resolve().parent.parent / "lm"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(LM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the lm modules it imports (anywhere in the file, function bodies included)."""
    modules = {_module_name(p): p for p in LM.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from lm.data import tokenizer` imports the module lm.data.tokenizer; the
                # package itself counts only when a name is not one of its modules.
                submodules = {f"{node.module}.{a.name}" for a in node.names}
                found |= submodules & modules.keys()
                if not submodules <= modules.keys():
                    found.add(node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_lm_has_no_import_cycles():
    graph = _imports()
    assert "lm.cli" in graph and graph["lm.cli"], "the scan found no imports; is LM right?"
    assert _cycles(graph) == []


def test_cycle_scan_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_at_most_six_modules_are_loose_at_the_top_level():
    loose = sorted(p.name for p in LM.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(loose) <= 6, loose


def test_no_command_imports_another_command():
    graph = _imports()
    for name, imported in graph.items():
        if name.startswith("lm.commands."):
            others = {m for m in imported if m.startswith("lm.commands.")}
            assert not others, f"{name} imports {sorted(others)}"


def test_only_the_cli_imports_commands():
    graph = _imports()
    importers = {
        n for n, imported in graph.items() if any(m.startswith("lm.commands") for m in imported)
    }
    assert importers <= {"lm.cli"}, importers
