"""The parent's side of the conversion workers: run one (``nailkit.tflite.workers``) in a child process.

Every conversion runs in its own subprocess (``python -m nailkit.tflite.workers <worker> ...`` through
``nailkit.core.subproc``: tensorflow/triton import order, memory, a timeout that holds even when the worker is silent),
with its output captured to a log file under ``outputs/logs/`` and echoed as a tqdm progress line; wall time and the
child's peak RSS are recorded. Callers use ``launch.run_worker(...)`` (one binding, one place to stand it in).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nailkit.core import subproc

#: a conversion worker still running after this is killed (rfdetr's own int8 export took up to 684 s on 2 cores)
WORKER_TIMEOUT_S = 3600.0

#: onnx2tf's own log lines that start a stage of route A (``subproc.run_python`` shows the stage and its time)
ONNX2TF_STAGES = (("Model optimizing started", "simplify (onnxsim)"), ("Model conversion started", "convert ops"),
                  ("saved_model output started", "SavedModel + fp32 TFLite"),
                  ("Float32 tflite output complete", "fp16 TFLite"))


class ConversionError(subproc.WorkerError):
    """A conversion worker failed, printed no result or timed out; the message names its log."""


def run_worker(args: list[str], log_path: Path, desc: str, timeout: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    """Run ``python -m nailkit.tflite.workers <args>`` (``nailkit.core.subproc.run_python``: log file, a progress line
    with the stage and its time, killed at ``timeout`` even when silent); returns the worker's result plus ``wall_s``
    and ``stages``."""
    try:
        return subproc.run_python(["-m", "nailkit.tflite.workers", *args], desc=desc, timeout=timeout, log_path=log_path,
                                  stages=ONNX2TF_STAGES if args[0] == "route-a" else ())
    except subproc.WorkerError as exc:
        raise ConversionError(str(exc)) from None
