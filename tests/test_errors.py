"""One error catalogue: every code medseg's source uses is declared once in medseg.errors.CODES, and the
published list (docs/errors.md, linked from the README) is generated from it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from medseg.errors import CODES, NOT_CODES, catalogue_markdown

REPO = Path(__file__).resolve().parents[1]
CODE = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+")


def _source_codes() -> dict[str, str]:
    """Every upper-snake-case string constant in medseg/ (outside errors.py) -> a file using it."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "medseg").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if path.name == "errors.py" and path.parent.name == "medseg":  # its functions, not the catalogue itself
            tree.body = [node for node in tree.body if not (isinstance(node, ast.AnnAssign) and
                                                            getattr(node.target, "id", "") in ("CODES", "NOT_CODES"))]
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and CODE.fullmatch(node.value):
                found.setdefault(node.value, str(path.relative_to(REPO)))
    return found


def test_every_code_raised_is_declared():
    undeclared = {code: where for code, where in _source_codes().items() if code not in CODES and code not in NOT_CODES}
    assert not undeclared, f"declare these in medseg/errors.py CODES (or NOT_CODES): {undeclared}"


def test_every_declared_code_is_used():
    used = set(_source_codes())
    assert not set(CODES) - used, f"declared but never raised: {sorted(set(CODES) - used)}"
    assert all(meaning.strip().endswith(".") for meaning in CODES.values())


def test_published_catalogue_is_generated_from_the_code():
    assert (REPO / "docs" / "errors.md").read_text(encoding="utf-8") == catalogue_markdown(), (
        "docs/errors.md is stale: python -m medseg.errors > docs/errors.md"
    )
    assert "docs/errors.md" in (REPO / "README.md").read_text(encoding="utf-8")


def test_the_checker_catches_an_undeclared_code(tmp_path: Path):
    tree = ast.parse('raise InputError("SOMETHING_NEW", "x")')
    constants = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert [c for c in constants if CODE.fullmatch(c) and c not in CODES] == ["SOMETHING_NEW"]
