"""Every notebook, executed by papermill in order on the demo checkpoint (trimmed parameters), is a regression test:
each ends with asserts of its own claims and writes outputs/<stem>.json, which later notebooks read."""

from __future__ import annotations

import json

import pytest

from nailkit.notebooks import OUTPUT_DIR, QUICK_PARAMETERS, notebook_paths, run_notebook

NOTEBOOKS = notebook_paths()


def test_the_seven_numbered_notebooks_exist_in_order():
    stems = [p.stem for p in NOTEBOOKS]
    assert stems == sorted(stems)
    assert [s[:2] for s in stems] == ["01", "02", "03", "04", "05", "06", "07"], stems
    assert list(QUICK_PARAMETERS) == stems


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(nb):
    summary = OUTPUT_DIR / f"{nb.stem}.json"
    if summary.exists():
        summary.unlink()  # the notebook must write it afresh
    executed = run_notebook(nb, QUICK_PARAMETERS.get(nb.stem, {}))
    assert executed.exists()
    data = json.loads(summary.read_text())
    claims = set(data) - {"notebook", "written_at"}  # write_summary adds those two itself
    assert claims, f"{summary}: the notebook wrote no numbers of its own"
