"""Checks of the one environment every route shares (see constraints.txt for why each version).

onnx2tf does not import onnxsim: it shells out to the ``onnxsim`` executable found on PATH. rfdetr's ``[onnx]`` extra
installs onnxsim 0.8.1, whose output loses shape inference and makes onnx2tf mis-guess layouts (the conversion then
dies at the projector Conv: "Depth of input (36) is not a multiple of input depth of filter (1536)"). So what matters
is which executable a conversion subprocess will find, and its version.
"""

from __future__ import annotations

import shutil
import subprocess
from importlib import metadata
from nailkit.core.subproc import child_env

#: onnxsim version onnx2tf 2.6.9 pins; measured to give a file byte-identical to onnxsim-prebuilt 0.4.39's here.
EXPECTED_ONNXSIM = "0.6.5"


def onnxsim_for_onnx2tf(env: dict[str, str] | None = None) -> tuple[str | None, str | None]:
    """(path, version) of the ``onnxsim`` executable that onnx2tf will run in a conversion subprocess."""
    env = env or child_env()
    exe = shutil.which("onnxsim", path=env["PATH"])
    if exe is None:
        return None, None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, env=env, timeout=120)
    text = (out.stdout + out.stderr).strip().split()
    version = text[-1].lstrip("v") if text else None
    return exe, version


def check_onnxsim() -> str:
    """Raise RuntimeError unless onnx2tf will call the expected onnxsim. Returns its path."""
    exe, version = onnxsim_for_onnx2tf()
    if exe is None:
        raise RuntimeError(f"no `onnxsim` executable on PATH for onnx2tf; install onnxsim=={EXPECTED_ONNXSIM} "
                           f"(`make venv` does)")
    if version != EXPECTED_ONNXSIM:
        raise RuntimeError(f"onnx2tf would call {exe} = onnxsim {version}, expected {EXPECTED_ONNXSIM}. "
                           f"onnxsim 0.8.x (pulled by rfdetr[onnx]) breaks onnx2tf's shape estimation; reinstall "
                           f"with `pip install --no-deps onnxsim=={EXPECTED_ONNXSIM}`.")
    return exe


def installed_versions(names: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out
