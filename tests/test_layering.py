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
