"""The README is the short front page and the docs/ pages behind it hold together: every relative link resolves (to a
file, and to a heading where it names one), every ``medseg`` command the README shows exists, and the README stays
short enough to read."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(line.lstrip("#")) for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def test_readme_links_every_docs_page():
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall((ROOT / "README.md").read_text(encoding="utf-8"))}
    assert {p.name for p in PAGES[1:]} <= linked


def test_every_command_in_the_readme_exists():
    from typer.main import get_command

    from medseg.cli import app

    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    # `medseg CMD` in code spans and table cells, .venv/bin/medseg CMD in the examples
    shown = set(re.findall(r"(?:`|/)medseg ([a-z][a-z-]+)", (ROOT / "README.md").read_text(encoding="utf-8")))
    assert shown and shown <= commands, f"README shows commands the CLI lacks: {sorted(shown - commands)}"


def test_readme_is_a_short_front_page():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
