"""Every published docs/NAME/tables.md is exactly what its script's `render` builds from the committed CSVs and
run record (the publishing convention of scripts/bench/harness.py). Folders are found generically: any docs/NAME/
with a run.json is checked, whichever script wrote it."""

import csv
import io
from pathlib import Path

import pytest

from scripts.bench.harness import RUN_RECORD, TABLES, read_run_record, render_folder

DOCS = Path(__file__).resolve().parents[2] / "docs"
FOLDERS = sorted(path.parent for path in DOCS.glob(f"**/{RUN_RECORD}"))  # docs/NAME/ or deeper (NAME/triton-3.6.0/)


def test_every_published_folder_has_a_run_record():
    # A docs/NAME/ with a table file but no run record could not be rebuilt, so it would escape the check below.
    tables = sorted(path.parent for path in DOCS.glob(f"**/{TABLES}"))
    assert tables, "no docs/NAME/tables.md found"
    assert [folder for folder in tables if folder not in FOLDERS] == []


@pytest.mark.parametrize("folder", FOLDERS, ids=[folder.name for folder in FOLDERS])
def test_tables_rebuild_exactly_from_committed_data(folder):
    record = read_run_record(folder)
    assert record["module"].startswith("scripts."), record["module"]
    assert (folder / TABLES).read_text() == render_folder(folder), (
        f"{folder / TABLES} differs from what {record['module']}.render builds from the files beside it; rebuild "
        f"it with `python -m {record['module']} --from-csv` (or rerun the script)")


@pytest.mark.parametrize("folder", FOLDERS, ids=[folder.name for folder in FOLDERS])
def test_changed_data_changes_the_tables(folder, tmp_path):
    # render reads the folder's files, not constants: perturbing one measured value must change the text.
    import shutil

    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    before = render_folder(copy)
    csvs = sorted(copy.glob("*.csv"))
    assert csvs, f"{folder} has no CSV"
    changed = False
    for path in csvs:
        original = path.read_text()
        header, *cells = list(csv.reader(io.StringIO(original)))
        for col, name in enumerate(header):
            if name in {"cpu", "cpu_id", "cpu_capability", "cores", "threads", "torch"}:
                continue
            if cells and all(_is_float(row[col]) for row in cells):
                perturbed = [row[:col] + [repr(float(row[col]) * 1.37 + 0.011)] + row[col + 1:] for row in cells]
                out = io.StringIO()
                csv.writer(out, lineterminator="\n").writerows([header, *perturbed])
                path.write_text(out.getvalue())
                try:
                    changed = render_folder(copy) != before
                except Exception:  # a perturbed count may break an invariant render relies on; try another column
                    changed = False
                path.write_text(original)
                if changed:
                    break
        if changed:
            break
    assert changed, f"no measured column of {folder}'s CSVs changes its tables.md"


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# A measured figure in prose: a decimal, a percentage, a ratio ("1.5x") or a number in scientific notation.
FIGURE = __import__("re").compile(r"(?<![\w.])(\d+\.\d+(?:e[-+]?\d+)?|\d+(?:\.\d+)?%|\d+(?:\.\d+)?x)(?![\w])")
PAGES = sorted(p for p in DOCS.glob("*.md") if (DOCS / p.stem / TABLES).exists())


@pytest.mark.parametrize("page", PAGES, ids=[page.stem for page in PAGES])
def test_prose_quotes_only_figures_its_tables_hold(page):
    """A page's prose quotes no figure that its rebuilt tables.md does not hold (no scratch runs, no earlier runs)."""
    tables = (DOCS / page.stem / TABLES).read_text()
    stray = [figure for figure in FIGURE.findall(page.read_text()) if figure not in tables]
    assert stray == [], f"{page.name} quotes {stray}, which {page.stem}/{TABLES} does not hold"
