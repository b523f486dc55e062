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
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("adapterbench")):
                base = pkg
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                full = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
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


WINGS = ("study", "results", "interop")
BOTTOM = ("errors", "config", "tasks", "data", "models", "model_parts", "metrics", "fileio", "records", "archive")


def test_wings_depend_downward_only():
    """study/, results/ and interop/ use recipe/ and the shared modules, never each other;
    recipe/ and methods/ never reach up into a wing or the CLI; the shared modules at the bottom
    import only each other."""
    for m, targets in import_graph().items():
        here = m.split(".")[1] if "." in m else ""
        for t in targets:
            there = t.split(".")[1] if "." in t else ""
            if here in WINGS:
                assert there not in WINGS or there == here, f"{m} imports {t}: wings do not depend on each other"
            if here in ("recipe", "methods"):
                assert there not in (*WINGS, "cli"), f"{m} imports {t}: {here}/ stays below the wings"
            if here in BOTTOM:
                assert there in (*BOTTOM, ""), f"{m} imports {t}: the shared modules stay at the bottom"


def test_the_house_stays_readable():
    """At most 12 modules at the package's top, at least 5 subpackages (cli/ among them), no file
    over 450 lines and no function over 60 (docs/architecture.md maps the rooms)."""
    top = [p for p in PKG.glob("*.py")]
    subpackages = [p for p in PKG.iterdir() if (p / "__init__.py").is_file()]
    assert len(top) <= 12, sorted(p.name for p in top)
    assert len(subpackages) >= 5 and (PKG / "cli" / "__init__.py").is_file()
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        assert len(path.read_text().splitlines()) <= 450, path
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{path.name}: {node.name}"
