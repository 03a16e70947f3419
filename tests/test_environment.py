"""The one environment: pins agree everywhere, and onnx2tf will call the right onnxsim."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nailkit.core import envcheck
from nailkit.core import subproc

REPO = Path(__file__).resolve().parent.parent


def _pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#")[0].strip().lstrip("-").strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


CONSTRAINTS = _pins((REPO / "constraints.txt").read_text().splitlines())


def test_onnx2tf_calls_the_pinned_onnxsim():
    exe, version = envcheck.onnxsim_for_onnx2tf()
    assert exe is not None and Path(exe).parent == subproc.venv_bin()
    assert version == envcheck.EXPECTED_ONNXSIM == CONSTRAINTS["onnxsim"]
    envcheck.check_onnxsim()


def test_onnxsim_check_catches_a_wrong_onnxsim(tmp_path, monkeypatch):
    fake = tmp_path / "onnxsim"
    fake.write_text("#!/bin/sh\necho onnxsim v0.8.1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(subproc, "venv_bin", lambda: tmp_path)
    with pytest.raises(RuntimeError, match="0.8.1"):
        envcheck.check_onnxsim()


def test_environment_yml_matches_constraints():
    text = (REPO / "environment.yml").read_text()
    assert re.search(r"^\s*-\s*python=3\.12\s*$", text, re.M)
    env_pins = _pins(text.splitlines())
    expected = {k: v for k, v in CONSTRAINTS.items() if k not in ("onnx2tf", "onnxsim")}
    assert env_pins == expected
    # the two --no-deps packages are named with their versions in the instructions
    assert f"onnx2tf=={CONSTRAINTS['onnx2tf']}" in text and f"onnxsim=={CONSTRAINTS['onnxsim']}" in text


def test_frozen_constraints_add_packages_and_agree_with_the_venv():
    """constraints-frozen.txt freezes what the direct pins pull in: it names no package constraints.txt pins (one
    place per pin), and the venv that runs these tests holds exactly its versions."""
    frozen = _pins((REPO / "constraints-frozen.txt").read_text().splitlines())
    assert len(frozen) > 100 and not set(frozen) & set(CONSTRAINTS)
    for name in ("jax", "jaxlib"):
        assert name in CONSTRAINTS and name not in frozen
    installed = envcheck.installed_versions(list(frozen))
    wrong = {n: (v, installed[n]) for n, v in frozen.items() if installed.get(n) != v}
    assert not wrong, f"venv differs from constraints-frozen.txt (pinned, installed): {wrong}"


def test_pyproject_pins_agree_with_constraints():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, version in _pins(deps).items():
        assert CONSTRAINTS.get(name) == version, f"{name}: pyproject {version} vs constraints {CONSTRAINTS.get(name)}"
    assert _pins(deps)["rfdetr"] == "1.11.2"


@pytest.mark.parametrize("name", ["rfdetr", "torch", "torchvision", "onnx", "onnxruntime", "onnxslim", "onnx2tf",
                                  "onnxsim", "tensorflow", "ai-edge-litert", "litert-torch", "numpy", "supervision",
                                  "jax", "jaxlib"])
def test_installed_versions_are_the_pinned_ones(name):
    assert envcheck.installed_versions([name])[name] == CONSTRAINTS[name]


def test_find_python_honours_override_and_rejects_non_312(tmp_path):
    script = REPO / "tools" / "find_python.sh"
    ok = subprocess.run([str(script)], env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip()
    bad = tmp_path / "python"
    bad.write_text("#!/bin/sh\nexit 1\n")
    bad.chmod(0o755)
    res = subprocess.run([str(script)], env={**os.environ, "PYTHON": str(bad)}, capture_output=True, text=True)
    assert res.returncode != 0 and "not a working Python 3.12" in res.stderr


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make workbook" in readme


def _has_outputs(path: Path) -> bool:
    nb = json.loads(path.read_text())
    return any(c.get("outputs") or c.get("execution_count") for c in nb.get("cells", []) if c["cell_type"] == "code")


def test_committed_notebooks_carry_no_outputs():
    from nailkit.core.notebooks import NOTEBOOK_DIR

    nbs = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    assert nbs, "no notebooks found"
    assert [p.name for p in nbs if _has_outputs(p)] == []


def test_each_notebook_has_exactly_one_parameters_cell():
    from nailkit.core.notebooks import NOTEBOOK_DIR

    for p in sorted(NOTEBOOK_DIR.glob("*.ipynb")):
        cells = json.loads(p.read_text())["cells"]
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, p.name
        assert "checkpoint" in "".join(tagged[0]["source"]) and "output_dir" in "".join(tagged[0]["source"]), p.name
