"""Every notebook, executed by papermill in order on the demo checkpoint (trimmed parameters), is a regression test:
each ends with asserts of its own claims and writes outputs/<stem>.json, which later notebooks read."""

from __future__ import annotations

import json

import pytest

from nailkit.core.notebooks import OUTPUT_DIR, QUICK_PARAMETERS, notebook_paths, run_notebook

NOTEBOOKS = notebook_paths()


def test_the_seven_numbered_notebooks_exist_in_order():
    stems = [p.stem for p in NOTEBOOKS]
    assert stems == sorted(stems)
    assert [s[:2] for s in stems] == ["01", "02", "03", "04", "05", "06", "07"], stems
    assert list(QUICK_PARAMETERS) == stems


def test_notebook_times_table_keeps_the_latest_run_of_each(tmp_path):
    from nailkit.core.notebooks import TIMES_FILE, record_time, time_table

    record_time("04_tflite_conversion", 600.0, True, tmp_path)
    record_time("05_inference_testing", 90.0, False, tmp_path)
    record_time("04_tflite_conversion", 300.0, True, tmp_path)  # a rerun replaces the row
    times = json.loads((tmp_path / TIMES_FILE).read_text())
    assert times["04_tflite_conversion"]["seconds"] == 300.0 and not times["05_inference_testing"]["ok"]
    table = (tmp_path / "notebook_times.md").read_text()
    assert "| 04_tflite_conversion | 5.0 | ok |" in table and "| 05_inference_testing | 1.5 | FAILED |" in table
    assert "| **all 2** | **6.5** |" in table
    assert "04_" not in time_table(times, since=times["05_inference_testing"]["finished_at"] + 1)


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
