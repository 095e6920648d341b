"""The package's shape: one import package, its private rooms, and no import cycles between its modules."""

from __future__ import annotations

import ast
from pathlib import Path

import celery_serve

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"celery_serve": ROOT / "app", "celery_serve.workers": ROOT / "workers", "celery_serve.api": ROOT / "api"}


def _modules() -> dict[str, Path]:
    """Every module of celery_serve, by dotted name, from the three folders it is laid on."""
    found: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The celery_serve modules `name` imports anywhere in its code, except for type checking only."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for target in targets:
            if target in known and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def test_the_distribution_is_one_package_named_celery_serve() -> None:
    assert celery_serve.__name__ == "celery_serve"
    assert Path(celery_serve.__file__).parent == ROOT / "app"
    assert isinstance(celery_serve.__version__, str) and celery_serve.__version__.count(".") == 2
    assert (ROOT / "app" / "py.typed").exists()


def test_the_wire_protocol_and_orchestration_are_private_rooms() -> None:
    names = set(_modules())
    for room in ("celery_serve._wire", "celery_serve._runtime", "celery_serve._cli"):
        assert room in names
    public = {n for n in names if n.count(".") == 1 and not n.split(".")[1].startswith("_")}
    # what a user may import: the API modules, plus the worker and gateway sides
    assert public <= {
        "celery_serve.application",
        "celery_serve.batch",
        "celery_serve.client",
        "celery_serve.config",
        "celery_serve.context",
        "celery_serve.deployment",
        "celery_serve.exceptions",
        "celery_serve.handle",
        "celery_serve.multiplex",
        "celery_serve.pipeline",
        "celery_serve.schema",
        "celery_serve.status",
        "celery_serve.workers",
        "celery_serve.api",
    }, public


def test_no_import_cycles() -> None:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    # A package's __init__ re-exports its children by design; cycles through __init__ modules are how
    # Python packages work. Every other edge must go one way.
    inits = {n for n, p in modules.items() if p.name == "__init__.py"}
    edges = {n: {t for t in targets if t not in inits} for n, targets in graph.items() if n not in inits}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_subpackage_is_in_the_distribution() -> None:
    """pyproject.toml lists packages by hand (setuptools' package-dir mapping); a new one must be listed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert packages == listed
