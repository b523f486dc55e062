"""The package's shape: no import cycles (every import statement, also those inside functions),
and recipes that do not branch on method names."""

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "adapterbench"


def import_graph() -> dict[str, set[str]]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    edges = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                full = f"{base}.{node.module}" if node.module else base
                for a in node.names:
                    target = f"{full}.{a.name}" if f"{full}.{a.name}" in mods else full
                    if target in mods and target != m:
                        edges[m].add(target)
            elif isinstance(node, ast.Import):
                edges[m].update(a.name for a in node.names if a.name in mods and a.name != m)
    return edges


def test_no_import_cycles():
    edges = import_graph()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in edges[m]:
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [])
    assert len(edges) > 20


def test_recipes_do_not_branch_on_method_names():
    for path in [*PKG.glob("recipe/*.py"), *PKG.glob("study/*.py"), *PKG.glob("cli/*.py")]:
        text = path.read_text()
        assert not re.search(r'KIND ==|"pfeiffer", "houlsby"', text), path
