"""Shared fixtures. Every test runs under nailkit's socket guard (``nailkit.core.offline``): any attempt to open a network
connection fails the test. NAILKIT_OFFLINE=1 puts every child process and papermill kernel under it too. (AF_UNIX and
loopback stay allowed: Jupyter kernels under papermill talk over local ZMQ/TCP on loopback only.)"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("NAILKIT_OFFLINE", "1")  # nailkit's own guard, in this process and every child / kernel
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(autouse=True)
def socket_guard(monkeypatch):
    """nailkit's own guard (nailkit.core.offline), applied to every test even if a test restored the real functions."""
    from nailkit.core import offline

    monkeypatch.setattr(socket.socket, "connect", offline._guard_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", offline._guard_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", offline._guard_getaddrinfo)
    yield


@pytest.fixture(scope="session")
def outputs_dir() -> Path:
    """The shared outputs/ dir: notebooks and tests reuse each other's artifacts (demo checkpoint, ONNX, TFLite)."""
    d = REPO / "outputs"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="session")
def demo_ckpt(outputs_dir):
    """The random-weight demo checkpoint as one ``Checkpoint`` (resolved and hashed once for the whole session)."""
    from nailkit.model.build import demo_checkpoint_path, resolve_checkpoint

    return resolve_checkpoint(demo_checkpoint_path(outputs_dir))


@pytest.fixture(scope="session")
def demo_model(demo_ckpt):
    from nailkit.model.build import load_model

    return load_model(demo_ckpt)


@pytest.fixture(scope="session")
def cpu_run():
    """Run a single-input .tflite once on LiteRT's CPU interpreter: cpu_run(path, x) -> first output."""
    def run(path, x):
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(path))
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        return it.get_tensor(it.get_output_details()[0]["index"])

    return run


_SESSION_START = time.time()


def pytest_terminal_summary(terminalreporter):
    """After the run: the wall time of every notebook this run executed (also in outputs/notebook_times.md)."""
    from nailkit.core.notebooks import OUTPUT_DIR, TIMES_FILE, time_table

    path = OUTPUT_DIR / TIMES_FILE
    if not path.exists():
        return
    times = json.loads(path.read_text())
    if any(v.get("finished_at", 0) >= _SESSION_START for v in times.values()):
        terminalreporter.write_sep("=", "notebook wall times (outputs/notebook_times.md)")
        terminalreporter.write_line(time_table(times, since=_SESSION_START))
