"""The README's "Measured" table quotes, for every page it links, exactly the headline `scripts/bench/headlines.py`
computes from that page's committed files: its primary statistic, with the CPU it was measured on."""

import re
from pathlib import Path

from scripts.bench.headlines import HEADLINES, headline

ROOT = Path(__file__).resolve().parents[2]


def measured_rows() -> list[tuple[str, str, list[str]]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Measured\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 3 and cells[0] not in ("topic", "---"):
            rows.append((cells[0], cells[1], re.findall(r"\(docs/(\w+)\.md\)", cells[2])))
    return rows


def test_every_headline_is_its_pages_primary_statistic():
    rows = measured_rows()
    assert len(rows) >= 6
    quoted = set()
    for topic, cell, pages in rows:
        measured = [p for p in pages if p in HEADLINES]
        assert measured, f"README row {topic!r} links no page with a headline: {pages}"
        for page in measured:
            expected = headline(page)
            assert expected in cell, f"README row {topic!r} must quote docs/{page}.md's headline:\n{expected}"
            quoted.add(page)
    assert quoted == set(HEADLINES)  # every measured page has its row


def test_a_changed_figure_is_caught(monkeypatch):
    """The check compares figures, not links: a README quoting another number fails it."""
    rows = measured_rows()
    topic, cell, pages = rows[0]
    changed = re.sub(r"\d+%", "99%", cell, count=1)
    assert changed != cell and headline(pages[0]) not in changed
