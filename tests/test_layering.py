"""The package's structure rules, checked on its source: each concept has one home (docs/architecture.md).

These read the code with `ast`, so a new module that breaks a rule fails here with the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import halp

PACKAGE = Path(halp.__file__).parent
CLI_CATCHES = {"HalpError", "KeyboardInterrupt"}


def _sources(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _caught_names(handler: ast.ExceptHandler) -> list[str]:
    if handler.type is None:
        return ["<bare except>"]
    nodes = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return [ast.unparse(node).rsplit(".", 1)[-1] for node in nodes]


def test_the_cli_catches_only_halp_errors_and_ctrl_c():
    """Any other exception is a bug and must surface with its traceback, not as a one-line user error."""
    offending = []
    for path in _sources(PACKAGE / "cli"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler):
                wrong = set(_caught_names(node)) - CLI_CATCHES
                if wrong:
                    offending.append(f"{path.relative_to(PACKAGE)}:{node.lineno} catches {sorted(wrong)}")
    assert not offending, "\n".join(offending)


def test_halp_error_is_caught_in_one_place():
    """The one handler (HalpGroup in cli/app.py) maps parameter names to flags; a local catch would not."""
    places = [
        f"{path.relative_to(PACKAGE)}:{node.lineno}"
        for path in _sources(PACKAGE / "cli")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ExceptHandler) and "HalpError" in _caught_names(node)
    ]
    assert len(places) == 1 and places[0].startswith("cli/app.py:"), places


def test_every_domain_error_derives_from_the_root():
    """errors.py is the error root: every exception class defined anywhere in halp derives from HalpError
    (private control-flow exceptions, named with a leading underscore, excepted)."""
    from halp import errors

    offending = []
    for path in _sources(PACKAGE):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue
            bases = {ast.unparse(base).rsplit(".", 1)[-1] for base in node.bases}
            if bases & {"Exception", "ValueError", "RuntimeError", "OSError", "KeyError", "TypeError", "LookupError"}:
                defined_in_errors = path == Path(errors.__file__)
                if not (defined_in_errors and issubclass(getattr(errors, node.name), errors.HalpError)):
                    where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
                    offending.append(f"{where} {node.name}({', '.join(sorted(bases))})")
    assert not offending, "\n".join(offending)


# ----- import direction: the layers docs/architecture.md draws ---------------------------------------------------
#: Each module's layer, lowest first; a module may import its own layer and those below, never one above. A new
#: module must be placed here (the test names it). halp.testing may import anything and is imported by nothing of the
#: package (test_production_code_does_not_import_the_test_kit).
LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": (
        "halp.version", "halp.errors", "halp.layout", "halp.features", "halp.userfiles", "halp.digests",
        "halp.locks", "halp.web", "halp.compact", "halp.shard", "halp.pages",
    ),
    "data and models": (
        "halp.data", "halp.rows", "halp.models", "halp.capture", "halp.loading", "halp.inputs", "halp.tiny_checkpoints",
    ),
    "extraction": (
        "halp.store", "halp.pipeline", "halp.run_records", "halp.local_engine", "halp.extract", "halp.ray_engine",
    ),
    "analysis": (
        "halp.label_rules", "halp.metrics", "halp.scaling", "halp.results", "halp.label", "halp.probe", "halp.findings",
        "halp.report", "halp.analyze", "halp.embed", "halp.predict", "halp.legacy", "halp.summary", "halp.review",
        "halp.sources", "halp.world",
    ),
    "applications": ("halp.serve", "halp.demo", "halp.cli", "halp.__main__", "halp"),
}


def _layer_of(module: str) -> int | None:
    """The layer of `module`: the longest prefix listed in LAYERS (halp.review.app -> halp.review); the package root
    `halp` (its lazy facade) is listed for itself only."""
    best: tuple[int, int] | None = None
    for rank, prefixes in enumerate(LAYERS.values()):
        for prefix in prefixes:
            covers = module == prefix or (prefix != "halp" and module.startswith(prefix + "."))
            if covers and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    return None if best is None else best[0]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(imported halp module or name, line) of every import that runs: module level and inside functions alike (a
    function-local import dodging a cycle is still the cycle); `if TYPE_CHECKING:` blocks, which never run, are not."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test).endswith("TYPE_CHECKING"):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = module.split(".") if is_package else module.split(".")[:-1]
                    parts = parts[: len(parts) - (child.level - 1)]
                    base = ".".join([*parts, *([base] if base else [])])
                found.extend((f"{base}.{alias.name}", child.lineno) for alias in child.names)
            visit(child)

    visit(tree)
    return [(name, line) for name, line in found if name == "halp" or name.startswith("halp.")]


def _import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported halp module: first line}, for every module of the package outside halp.testing."""
    sources = {_module_name(path): path for path in _sources(PACKAGE)}
    graph: dict[str, dict[str, int]] = {}
    for module, path in sources.items():
        if module.startswith("halp.testing"):
            continue
        edges = graph.setdefault(module, {})
        for name, line in _runtime_imports(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            target = name
            while target not in sources and "." in target:  # `from halp.x import name`: the module is halp.x
                target = target.rsplit(".", 1)[0]
            if target in sources and target != module:
                edges.setdefault(target, line)
    return graph


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_layers():
    graph = _import_graph()
    unplaced = sorted(module for module in graph if _layer_of(module) is None)
    assert not unplaced, f"place these modules in LAYERS (and in docs/architecture.md): {unplaced}"
    names = list(LAYERS)
    upward = [
        f"{module}:{line} imports {target} ({names[_layer_of(target)]} is above {names[_layer_of(module)]})"
        for module, edges in sorted(graph.items())
        for target, line in sorted(edges.items())
        if not target.startswith("halp.testing") and _layer_of(target) > _layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_the_package_has_no_import_cycles():
    """Not even through function-local imports: each cycle is listed with the lines that close it."""
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph.get(module, {}):
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            connect(module)
    described = [
        " <-> ".join(cycle) + ": " + "; ".join(
            f"{a}:{line} -> {b}" for a in cycle for b, line in graph[a].items() if b in cycle
        )
        for cycle in cycles
    ]
    assert not cycles, "\n".join(described)


def _imported_modules(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module name) of every import in a module, function-local and TYPE_CHECKING ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                package = module.split(".")[: len(module.split(".")) - (0 if is_package else 1)]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def test_production_code_does_not_import_the_test_kit():
    """halp.testing (fixtures, fault injection, run helpers) serves the tests and benchmarks; what production code
    needs from it lives below it (tiny checkpoints: halp.tiny_checkpoints), so no module outside halp/testing
    imports halp.testing, not even inside a function."""
    offending = []
    for path in _sources(PACKAGE):
        relative = path.relative_to(PACKAGE.parent)
        if relative.parts[:2] == ("halp", "testing"):
            continue
        module = ".".join(relative.with_suffix("").parts)
        for line, name in _imported_modules(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            if name == "halp.testing" or name.startswith("halp.testing."):
                offending.append(f"{path.relative_to(PACKAGE)}:{line} imports {name}")
    assert not offending, "\n".join(offending)
