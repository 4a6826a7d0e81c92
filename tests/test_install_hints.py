"""The distribution's own name (`halp-vlm`: `halp` on the package index is an unrelated project) and every install
hint: each names an extra that pyproject.toml defines, and that extra holds the package whose absence printed it."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import halp
from halp import errors
from halp.errors import DISTRIBUTION, MissingDependencyError, ReviewServerError, install_hint

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the checks read pyproject.toml

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _requirement_names(extra: str) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower() for requirement in EXTRAS[extra]}


def test_the_distribution_has_its_own_name_and_keeps_the_import_and_the_command() -> None:
    assert PYPROJECT["project"]["name"] == DISTRIBUTION == "halp-vlm"
    assert PYPROJECT["project"]["scripts"] == {"halp": "halp.cli:app"}
    assert Path(halp.__file__).parent == ROOT / "src" / "halp"


def test_every_install_hint_in_the_code_names_an_extra_of_pyproject() -> None:
    called = []
    for path in sorted((ROOT / "src" / "halp").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "install_hint":
                (argument,) = node.args
                assert isinstance(argument, ast.Constant), f"{path}:{node.lineno}: the extra must be a literal"
                called.append(argument.value)
    named = {extra for group in called for extra in group.split(",")}  # "ray,serve": two extras in one hint
    assert sorted(named) == ["latentlens", "ray", "review", "serve"]
    assert named <= set(EXTRAS)


def test_no_text_tells_anyone_to_install_the_other_projects_name() -> None:
    """`pip install halp` / `halp[extra]` would install the unrelated project; every name-based hint says halp-vlm,
    and every extra that a command in the docs installs exists."""
    texts = [*DOCUMENTS, *sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py"))]
    wrong, extras_named = [], set()
    for path in texts:
        if path == Path(__file__):
            continue
        text = path.read_text()
        wrong += [f"{path.relative_to(ROOT)}: {m.group()}" for m in re.finditer(r"(?<![\w-])halp\[\w+\]", text)]
        wrong += [f"{path.relative_to(ROOT)}: {m.group()}" for m in re.finditer(r"pip install '?halp(?![\w-])", text)]
        extras_named |= {m.group(1) for m in re.finditer(r"""pip install[^\n`]*?(?:halp-vlm|\.)\[([\w,]+)\]""", text)}
    assert not wrong, wrong
    named = {extra for group in extras_named for extra in group.split(",")}
    assert named and named <= set(EXTRAS), named - set(EXTRAS)


def test_the_hint_names_the_checkout_from_a_checkout_and_the_distribution_otherwise(monkeypatch) -> None:
    assert errors.source_checkout() == ROOT  # the tests run from the checkout (an editable install)
    assert install_hint("review") == f"pip install -e '{ROOT}[review]'"
    monkeypatch.setattr(errors, "source_checkout", lambda: None)
    assert install_hint("review") == "pip install 'halp-vlm[review]'"


def test_a_missing_review_stack_names_the_extra_that_installs_it(monkeypatch) -> None:
    from halp.review.app import _require_web_stack

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now raises ImportError
    with pytest.raises(ReviewServerError) as caught:
        _require_web_stack()
    message = str(caught.value)
    assert "uvicorn is missing" in message and message.endswith(install_hint("review"))
    assert {"starlette", "uvicorn"} <= _requirement_names("review")


def test_a_missing_ray_names_the_extra_that_installs_it(monkeypatch) -> None:
    from halp.ray_engine import _import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError) as caught:
        _import_ray()
    assert str(caught.value).endswith(install_hint("ray"))
    assert "ray" in _requirement_names("ray") and "data" in EXTRAS["ray"][0].split("[")[1]


def test_a_missing_latentlens_names_the_extra_that_installs_it(monkeypatch) -> None:
    from halp.analyze import ContextualLens

    monkeypatch.setitem(sys.modules, "latentlens", None)
    with pytest.raises(MissingDependencyError) as caught:
        ContextualLens(adapter=None, corpus=["a sentence"], layers=[0])  # type: ignore[arg-type]
    assert str(caught.value).endswith(install_hint("latentlens"))
    assert "latentlens" in _requirement_names("latentlens")
