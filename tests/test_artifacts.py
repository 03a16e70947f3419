"""nailkit.core.artifacts: content key, sidecar, atomic publication, validity by content hash; the subprocess helper;
the offline switch; the warnings filter."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from nailkit.core import artifacts
from nailkit.core import subproc


def test_publish_then_cached_checks_key_and_content(tmp_path):
    dst = tmp_path / "sub" / "model.bin"
    h, key = artifacts.artifact_key("demo", "abc", {"resolution": 432}, ("numpy",))
    assert key["versions"]["nailkit"] and key["versions"]["numpy"]
    with artifacts.staging(dst) as work:
        staged = work / "model.bin"
        staged.write_bytes(b"x" * 100)
        art = artifacts.publish(staged, dst, {"key": key})
    assert not work.exists() and art.path == dst and dst.read_bytes() == b"x" * 100
    path, meta = art  # unpacks like the old (path, meta) tuples
    assert meta["sha256"] == artifacts.file_sha256(dst, 64) and meta["bytes"] == 100
    assert artifacts.cached(dst, key)["sha256"] == meta["sha256"]
    _, other = artifacts.artifact_key("demo", "abc", {"resolution": 336}, ("numpy",))
    assert artifacts.cached(dst, other) is None  # other parameters
    dst.write_bytes(b"y" * 100)  # edited in place, same size
    assert artifacts.cached(dst, key) is None
    artifacts.sidecar_path(dst).write_text("{not json")
    assert artifacts.cached(dst, key) is None


def test_publish_replaces_an_old_sidecar_before_the_file(tmp_path):
    dst = tmp_path / "m.bin"
    dst.write_bytes(b"old")
    artifacts.write_sidecar(dst, {"key": {"k": 1}, "sha256": artifacts.file_sha256(dst, 64)})
    staged = tmp_path / "staged.bin"
    staged.write_bytes(b"new")
    artifacts.publish(staged, dst, {"key": {"k": 2}})
    assert json.loads(artifacts.sidecar_path(dst).read_text())["key"] == {"k": 2}


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        artifacts.atomic_write(tmp_path / "f.json", boom)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_into_a_file_path_fails_even_as_root(tmp_path):
    """Root ignores permission bits; a parent that is a file stops everyone."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(OSError):
        artifacts.atomic_write(blocker / "out.json", lambda tmp: tmp.write_text("{}"))
    assert blocker.read_text() == "a file, not a folder"


def test_worker_result_and_log(tmp_path):
    code = "import sys; print('working'); from nailkit.core.subproc import emit; emit({'files': {'fp32': 'x'}})"
    log = tmp_path / "w.log"
    res = subproc.run_python(["-c", code], desc="ok", timeout=120, log_path=log, progress=False)
    assert res["files"] == {"fp32": "x"} and res["wall_s"] > 0
    assert "working" in log.read_text()


def test_worker_stages_from_markers_and_stage_lines(tmp_path, capsys):
    code = ("import time; from nailkit.core.subproc import emit, stage; print('Model conversion started ==='); "
            "time.sleep(0.6); stage('quantize int8'); time.sleep(0.6); emit({})")
    res = subproc.run_python(["-c", code], desc="conv", timeout=120, stages=[("Model conversion started", "convert")])
    names = [n for n, _ in res["stages"]]
    assert names == ["start", "convert", "quantize int8"]
    assert all(t >= 0.5 for n, t in res["stages"] if n != "start")
    err = capsys.readouterr()
    out = err.out + err.err
    assert "conv: done in 0:01 (convert 1 s, quantize int8 1 s)" in out
    # captured (not a terminal): one plain line per stage, no redrawn line of carriage returns
    assert "\r" not in out and "conv: convert … (total 0:00)" in out and "conv: quantize int8 … (total 0:0" in out


def test_worker_failure_names_the_stage(tmp_path):
    code = "from nailkit.core.subproc import stage; stage('simplify'); raise SystemExit(4)"
    with pytest.raises(subproc.WorkerError, match=r"exit 4\) in simplify after 0:0"):
        subproc.run_python(["-c", code], desc="bad", timeout=60, progress=False)


def test_worker_failure_names_the_log(tmp_path):
    log = tmp_path / "w.log"
    with pytest.raises(subproc.WorkerError, match=r"exit 3.*w\.log.*boom") as err:
        subproc.run_python(["-c", "print('boom'); raise SystemExit(3)"], desc="bad", timeout=60, log_path=log,
                           progress=False)
    assert (err.value.returncode, err.value.timed_out, err.value.result) == (3, False, None)


def test_worker_failure_after_its_result_keeps_the_result():
    code = "from nailkit.core.subproc import emit; emit({'verdict': 1}); raise SystemExit(-11 % 256)"
    with pytest.raises(subproc.WorkerError, match="exit 245") as err:
        subproc.run_python(["-c", code], desc="crash on exit", timeout=60, progress=False)
    assert err.value.returncode == 245 and err.value.result == {"verdict": 1}


def test_silent_worker_is_killed_at_its_timeout(tmp_path):
    """A worker that prints nothing and never ends is killed by the parent's clock, not by its own output."""
    pid_file = tmp_path / "pid"
    code = ("import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); sys.stdout.flush(); "
            "time.sleep(600)")
    t0 = time.time()
    with pytest.raises(subproc.WorkerError, match="timed out after 15 s") as err:
        subproc.run_python(["-c", code, str(pid_file)], desc="silent", timeout=15, progress=False)
    assert err.value.timed_out and err.value.returncode is None
    assert time.time() - t0 < 90  # the 40-minute pytest timeout is not what stops it
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone (killed and reaped)


def test_tflite_run_worker_goes_through_the_helper(monkeypatch):
    from nailkit.tflite import launch

    seen = {}

    def fake(args, **kw):
        seen.update(args=args, **kw)
        raise subproc.WorkerError("silent: timed out after 5 s and was killed")

    monkeypatch.setattr(subproc, "run_python", fake)
    with pytest.raises(launch.ConversionError, match="timed out"):
        launch.run_worker(["route-b", "x"], Path("log"), "litert", timeout=5)
    assert seen["args"][:2] == ["-m", "nailkit.tflite.workers"] and seen["timeout"] == 5


# ----------------------------------------------------------------------------------------------------------------
# nailkit.core.offline and nailkit.core.warnings_filter
# ----------------------------------------------------------------------------------------------------------------

PROBE = """
import os, socket
import nailkit
from nailkit.core.subproc import emit
try:
    socket.create_connection(("192.0.2.1", 80), timeout=0.5)
    outcome = "connected"
except Exception as exc:
    outcome = type(exc).__name__
emit({"outcome": outcome, "hf": os.environ.get("HF_HUB_OFFLINE")})
"""


def test_children_are_offline_and_guarded():
    """Children (conversion workers, papermill kernels) get NAILKIT_OFFLINE=1 and import nailkit: the guard is on."""
    env = subproc.child_env({"NAILKIT_OFFLINE": "1"})
    env.pop("HF_HUB_OFFLINE", None)
    res = subproc.run_python(["-c", PROBE], desc="probe", timeout=120, progress=False, env=env)
    assert res == {"outcome": "NetworkAccessError", "hf": "1", "wall_s": res["wall_s"], "stages": res["stages"]}
    assert subproc.child_env()["NAILKIT_OFFLINE"] in ("0", "1")  # always set for a child


def test_offline_switch_off_leaves_sockets_alone():
    env = subproc.child_env({"NAILKIT_OFFLINE": "0"})
    env.pop("HF_HUB_OFFLINE", None)
    code = ("import socket; real = socket.socket.connect; import nailkit; from nailkit.core.subproc import emit; "
            "import os; emit({'same': socket.socket.connect is real, 'hf': os.environ.get('HF_HUB_OFFLINE')})")
    res = subproc.run_python(["-c", code], desc="probe", timeout=120, progress=False, env=env)
    assert res["same"] is True and res["hf"] is None


NOISY = """
import logging, warnings
import nailkit
warnings.warn("`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`.", FutureWarning)
warnings.warn("a real problem", FutureWarning)
log = logging.getLogger("rf-detr")
log.addHandler(logging.StreamHandler())
log.warning("Using patch size 12 instead of 14, which means we're not loading DINOv2 backbone weights.")
log.warning("something else")
"""


def test_known_warnings_are_silenced_and_others_kept():
    """As a notebook kernel sees it: import nailkit, then the known noise is gone and real warnings still show."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", NOISY], capture_output=True, text=True, timeout=120,
                         env=subproc.child_env())
    assert out.returncode == 0, out.stderr
    assert "a real problem" in out.stderr and "something else" in out.stderr
    assert "torch.jit.script" not in out.stderr and "DINOv2" not in out.stderr
    shown = subprocess.run([sys.executable, "-c", NOISY], capture_output=True, text=True, timeout=120,
                           env=subproc.child_env({"NAILKIT_SHOW_ALL_WARNINGS": "1"}))
    assert "torch.jit.script" in shown.stderr and "DINOv2" in shown.stderr
