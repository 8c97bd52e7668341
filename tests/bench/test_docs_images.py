"""Every image the README and the docs pages show, and every file they link to, exists at the path their markdown
gives."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# ![alt](path) and [text](path), with an optional "title"; group 1 is "!" for an image.
LINK = re.compile(r"(!?)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(page: Path, images: bool) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks show markdown, they do not render it
    return [target for bang, target in LINK.findall(text)
            if bool(bang) == images and not re.match(r"[a-z]+:", target) and not target.startswith("#")]


def missing(page: Path, images: bool) -> list[str]:
    return [target for target in links(page, images) if not (page.parent / target.split("#")[0]).exists()]


def test_the_pages_show_images():
    assert any(links(page, images=True) for page in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_image_exists(page):
    absent = missing(page, images=True)
    assert not absent, f"{page.relative_to(ROOT)} shows images that do not exist: {absent}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_linked_file_exists(page):
    absent = missing(page, images=False)
    assert not absent, f"{page.relative_to(ROOT)} links to files that do not exist: {absent}"
