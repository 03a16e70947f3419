"""The one way nailkit runs Python in a child process (conversions, fresh-process benchmarks, delegation reports, GPU
delegate verdicts).

Protocol: the child prints whatever it likes and, last, one line ``NAILKIT_RESULT <json>`` (``emit``). A line
``NAILKIT_STAGE <name>`` (``stage``) starts a named stage; so does any line holding one of the caller's ``stages``
markers (e.g. onnx2tf's own "Model conversion started"). The parent (``run_python``) merges stdout and stderr into an
optional log file, shows one progress line (the stage and the time spent, refreshed every second), says when the child
is done and how long each stage took, and returns the JSON with ``wall_s`` and ``stages`` ([[name, seconds], …]).
The **timeout is enforced by the parent's clock, not by the child's output**: a child that hangs without printing is
killed (its whole process group) when the timeout expires.

Children inherit an offline environment (``child_env``: ``NAILKIT_OFFLINE=1``, ``HF_HUB_OFFLINE=1``, this
interpreter's bin dir first on PATH so onnx2tf finds this venv's ``onnxsim``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from nailkit.core.offline import OFFLINE_ENV
from nailkit.core.paths import REPO_ROOT
RESULT_PREFIX = "NAILKIT_RESULT "
STAGE_PREFIX = "NAILKIT_STAGE "


class WorkerError(RuntimeError):
    """A child process failed, printed no result, or ran past its timeout (the message names the log).

    ``returncode``: the child's exit status (None when it was killed at the timeout); ``timed_out``; ``result``: the
    ``NAILKIT_RESULT`` JSON when the child printed one and then exited non-zero, else None."""

    def __init__(self, message: str, *, returncode: Optional[int] = None, timed_out: bool = False,
                 result: Optional[dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.timed_out = timed_out
        self.result = result


def venv_bin() -> Path:
    return Path(sys.executable).parent


def child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Environment for a child process: this interpreter's bin dir first on PATH, offline, unbuffered, quiet TF."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(venv_bin()), env.get("PATH", "")])
    for k, v in OFFLINE_ENV.items():
        env.setdefault(k, v)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def stage(name: str) -> None:
    """Child side: say that a named stage starts (the parent shows it with its elapsed time)."""
    print(STAGE_PREFIX + name, flush=True)


class StageClock:
    """Stages and their durations, for the progress line and the result."""

    def __init__(self, first: str = "start") -> None:
        self.t0 = self.since = time.time()
        self.name = first
        self.done: list[list[Any]] = []

    def start(self, name: str) -> None:
        now = time.time()
        if name != self.name:
            self.done.append([self.name, round(now - self.since, 1)])
            self.name, self.since = name, now

    def finish(self) -> list[list[Any]]:
        self.done.append([self.name, round(time.time() - self.since, 1)])
        return self.done

    def line(self) -> str:
        now = time.time()
        return f"{self.name} {now - self.since:.0f} s (total {_mmss(now - self.t0)})"


@contextlib.contextmanager
def step(desc: str, name: str, progress: bool = True) -> Iterator[None]:
    """Parent side: a stage run in this process (e.g. the ONNX export before a conversion, the gate after it): one
    line when it starts and one with its time when it is done."""
    from tqdm.auto import tqdm

    t0 = time.time()
    if progress:
        tqdm.write(f"{desc}: {name} …")
    yield
    if progress:
        tqdm.write(f"{desc}: {name} done in {_mmss(time.time() - t0)}")


def _live_terminal() -> bool:
    """Whether a redrawn progress line reads well here: a terminal, or Jupyter (tqdm.auto draws a widget there). A
    file or pipe gets plain lines instead (a redrawn line would be one long line of carriage returns)."""
    return "ipykernel" in sys.modules or bool(getattr(sys.stderr, "isatty", lambda: False)())


def _mmss(s: float) -> str:
    return f"{int(s) // 60}:{int(s) % 60:02d}"


def emit(result: dict[str, Any]) -> None:
    """Child side: print the result line the parent reads (call it last)."""
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)


def run_python(args: Sequence[str], *, desc: str, timeout: float, log_path: Optional[Path] = None,
               progress: bool = True, env: Optional[dict[str, str]] = None,
               stages: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Run ``python <args>`` in the repo root; return the child's ``NAILKIT_RESULT`` JSON plus ``wall_s`` and
    ``stages``. ``stages``: (marker, stage name) pairs; a child's line containing the marker starts that stage.

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
    clock = StageClock()
    live = progress and _live_terminal()  # a log file gets one line per stage, not a redrawn line
    bar = tqdm(desc=desc, bar_format="{desc}{postfix}", leave=False, disable=not live)
    bar.set_postfix_str(clock.line(), refresh=True)

    def start(stage: str) -> None:
        clock.start(stage)
        if progress and not live:
            tqdm.write(f"{desc}: {stage} … (total {_mmss(time.time() - t0)})")

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if log:
                log.write(line)
                log.flush()
            if line.startswith(RESULT_PREFIX):
                found["result"] = line[len(RESULT_PREFIX):]
                continue
            if line.startswith(STAGE_PREFIX):
                start(line[len(STAGE_PREFIX):].strip())
                continue
            for marker, name in stages:
                if marker in line:
                    start(name)
            tail.append(line.rstrip())
            del tail[:-20]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while True:  # the parent's clock: refresh the line every second, kill at the timeout
            try:
                rc = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if time.time() - t0 > timeout:
                    _kill_group(proc)
                    raise WorkerError(f"{desc}: timed out after {timeout:.0f} s and was killed{where}",
                                      timed_out=True) from None
                bar.set_postfix_str(clock.line(), refresh=True)
    finally:
        reader.join(timeout=10)
        bar.close()
        if log:
            log.close()
    wall = time.time() - t0
    done = clock.finish()
    if rc != 0 or "result" not in found:
        raise WorkerError(f"{desc} failed (exit {rc}) in {clock.name} after {_mmss(wall)}{where}; last lines: "
                          + " | ".join(tail[-6:]), returncode=rc, result=_loads(found.get("result")))
    if progress:
        tqdm.write(f"{desc}: done in {_mmss(wall)} (" + ", ".join(f"{n} {t:.0f} s" for n, t in done if t >= 0.5)
                   + ")")
    result = json.loads(found["result"])
    result["wall_s"] = wall
    result["stages"] = done
    return result


def _loads(line: Optional[str]) -> Optional[dict[str, Any]]:
    """A failed child's result line, if it printed a readable one."""
    try:
        return None if line is None else json.loads(line)
    except json.JSONDecodeError:
        return None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()
