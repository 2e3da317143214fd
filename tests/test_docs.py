"""The documentation works in a clone: the README's Python example runs as written and its PNG
carries its parameters, every relative link resolves to a file in the repository (and to a
heading there, for a link with an anchor), and the demo model's page says what the model draws."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from sdlab.infotext import parse_infotext
from sdlab.training.shapes import COLOURS, SHAPES

ROOT = Path(__file__).resolve().parents[1]
DEMO_PAGE = ROOT / "src" / "sdlab" / "demo" / "README.md"
PAGES = sorted({ROOT / "README.md", ROOT / "CONTRIBUTING.md", DEMO_PAGE, *(ROOT / "docs").glob("*.md")})

_FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"`([^`\s]+\.md(?:#[\w-]+)?)`")


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {_slug(h) for h in re.findall(r"^#+\s+(.*)$", text, re.M)}


def test_readme_python_example_saves_the_png_with_its_parameters(tmp_path, monkeypatch):
    """The README's example as written, in an empty folder: `image.save("out.png")` writes the
    infotext, which reads back with the example's own parameters."""
    (code,) = [block for block in _code_blocks((ROOT / "README.md").read_text(), "python") if "import sdlab" in block]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    params = parse_infotext(Image.open(tmp_path / "out.png").info["parameters"])
    assert params["Prompt"] == "a red circle on a blue background"
    assert (params["Seed"], params["Steps"], params["Model"]) == ("42", "20", "demo")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(page):
    """Markdown links, and file names in code spans that name a page (`docs/training.md`), from
    the page's folder or the repository's root as prose writes them; anchors name a heading."""
    text = _FENCE.sub("", page.read_text())
    links = [(target, [page.parent]) for target in _LINK.findall(text)]
    links += [(target, [page.parent, ROOT]) for target in _CODE_SPAN.findall(text)]
    for target, bases in links:
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        found = [(base / path).resolve() if path else page for base in bases]
        found = [p for p in found if p.is_file() and p.is_relative_to(ROOT)]
        assert found, f"{page.relative_to(ROOT)}: {target} is not a file in the repository"
        if anchor:
            assert anchor in _anchors(found[0]), f"{page.relative_to(ROOT)}: {target} names no heading"


def test_the_readme_links_the_demo_models_page():
    assert "](src/sdlab/demo/README.md)" in (ROOT / "README.md").read_text()


def test_the_demo_models_page_says_what_it_draws():
    """Every shape and colour of its training set (`training.shapes`) and its size, in the list at
    the top of the page."""
    intro = DEMO_PAGE.read_text().split("\n## ", 1)[0]
    assert f"{len(SHAPES)} shapes: {', '.join(SHAPES)}" in intro
    assert f"{len(COLOURS)} colours: {', '.join(COLOURS)}" in intro
    assert "64x64 pixels" in intro
