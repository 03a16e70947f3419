"""The one way nailkit runs Python in a child process (conversions, fresh-process benchmarks, delegation reports).

Protocol: the child prints whatever it likes and, last, one line ``NAILKIT_RESULT <json>`` (``emit``). The parent
(``run_python``) merges stdout and stderr into an optional log file, shows a tqdm line, and returns the JSON with
``wall_s``. The **timeout is enforced by the parent's clock, not by the child's output**: a child that hangs without
printing is killed (its whole process group) when the timeout expires.

Children inherit an offline environment (``child_env``: ``NAILKIT_OFFLINE=1``, ``HF_HUB_OFFLINE=1``, this
interpreter's bin dir first on PATH so onnx2tf finds this venv's ``onnxsim``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "NAILKIT_RESULT "


class WorkerError(RuntimeError):
    """A child process failed, printed no result, or ran past its timeout (the message names the log)."""


def venv_bin() -> Path:
    return Path(sys.executable).parent


def child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Environment for a child process: this interpreter's bin dir first on PATH, offline, unbuffered, quiet TF."""
    from nailkit.offline import OFFLINE_ENV

    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(venv_bin()), env.get("PATH", "")])
    for k, v in OFFLINE_ENV.items():
        env.setdefault(k, v)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def emit(result: dict[str, Any]) -> None:
    """Child side: print the result line the parent reads (call it last)."""
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)


def run_python(args: Sequence[str], *, desc: str, timeout: float, log_path: Optional[Path] = None,
               progress: bool = True, env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Run ``python <args>`` in the repo root; return the child's ``NAILKIT_RESULT`` JSON plus ``wall_s``.

    Raises ``WorkerError`` when the child exits non-zero, prints no result, or is still running after ``timeout``
    seconds (then it and its children are killed, whether or not it prints)."""
    from tqdm.auto import tqdm

    cmd = [sys.executable, *args]
    tail: list[str] = []
    found: dict[str, Any] = {}
    log = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "w")
        log.write("$ " + " ".join(cmd) + "\n")
    where = f"; log: {log_path}" if log_path else ""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=env or child_env(), cwd=str(REPO_ROOT), start_new_session=True)
    bar = tqdm(desc=desc, unit=" lines", leave=True, disable=not progress)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if log:
                log.write(line)
                log.flush()
            if line.startswith(RESULT_PREFIX):
                found["result"] = line[len(RESULT_PREFIX):]
                continue
            tail.append(line.rstrip())
            del tail[:-20]
            bar.update(1)
            short = line.strip().replace("\x1b", "")[:60]
            if short:
                bar.set_postfix_str(short, refresh=False)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise WorkerError(f"{desc}: timed out after {timeout:.0f} s and was killed{where}") from None
    finally:
        reader.join(timeout=10)
        bar.close()
        if log:
            log.close()
    wall = time.time() - t0
    if rc != 0 or "result" not in found:
        raise WorkerError(f"{desc} failed (exit {rc}){where}; last lines: " + " | ".join(tail[-6:]))
    result = json.loads(found["result"])
    result["wall_s"] = wall
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()
