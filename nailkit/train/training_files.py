"""nailkit's own training files (PyTorch Lightning ``.ckpt`` resume state, rfdetr's ``checkpoint_best_*.pth``): loaded
with ``torch.load(weights_only=True)`` and an explicit allow-list (``TRAINING_FILE_GLOBALS``), anything else refused
with a one-line error unless the user gives their word (``trusted=True``, ``--trusted``); and what a train-demo work
folder's newest full state says (which file, optimizer steps done, training seconds spent).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path
from typing import Any

from nailkit.model.checkpoint_loading import CheckpointError

#: Globals beyond torch's weights-only set that nailkit's own training files may hold. Measured with
#: ``torch.serialization.get_unsafe_globals_in_checkpoint`` on a real run (rfdetr 1.11.2, pytorch-lightning 2.6.6,
#: torch 2.14.1): ``last.ckpt`` / ``checkpoint_<epoch>.ckpt`` and rfdetr's ``checkpoint_best_*.pth`` /
#: ``last_ema.pth`` hold none; the ``.pth`` that train-demo packages holds ``argparse.Namespace`` (its ``args``).
#: tests/test_train.py measures it again on every slow run.
TRAINING_FILE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


def _untrusted_reason(exc: BaseException, path: Path | None = None) -> str:
    if path is not None:
        try:  # a torch.save zip: torch lists its globals without unpickling anything
            import torch

            allowed = {f"{g.__module__}.{g.__qualname__}" for g in TRAINING_FILE_GLOBALS}
            names = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
            if names:
                return ("the Python global " if len(names) == 1 else "the Python globals ") + ", ".join(names[:5])
        except Exception:  # noqa: BLE001 - a raw pickle: fall back to the unpickler's message
            pass
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"the Python global {found.group(1)}"
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return f"a pickle instruction (opcode {found.group(1)}) that weights-only loading does not accept"
    found = re.search(r"(Trying to [^\n.]*)", text)
    if found:
        return found.group(1).strip()
    return "Python objects that weights_only loading refuses"


def _load_training_file(path: str | os.PathLike[str], *, trusted: bool = False,
                        what: str = "training state") -> tuple[dict[str, Any], bool]:
    """``(contents, needed_trust)``: ``weights_only=True`` with ``TRAINING_FILE_GLOBALS``; a file that needs more is
    refused (``CheckpointError``, one line naming the file and how to trust it) unless ``trusted``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (expected a {what} written by train-demo)")
    needed_trust = False
    try:
        with torch.serialization.safe_globals(list(TRAINING_FILE_GLOBALS)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trusted:
            raise CheckpointError(
                f"{path}: refused: holds {_untrusted_reason(exc, path)}, outside the allow-list of what nailkit's own "
                f"training files contain, and unpickling it could run code; if you wrote this file and trust it, "
                f"pass --trusted (train_demo/package_checkpoint(trusted=True))") from None
        needed_trust = True
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointError(f"{path}: could not be unpickled even as trusted ({type(exc2).__name__}: "
                                  f"{str(exc2).strip().splitlines()[0] if str(exc2).strip() else ''})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable {what} ({first}); expected a file that torch.save wrote, "
                              f"e.g. train-demo's last.ckpt or checkpoint_best_total.pth") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict ({what})")
    return obj, needed_trust


def load_training_file(path: str | os.PathLike[str], *, trusted: bool = False,
                       what: str = "training state") -> dict[str, Any]:
    """Load one of nailkit's own training files (PTL ``.ckpt`` resume state, rfdetr's ``checkpoint_best_*.pth``)
    safely: ``torch.load(weights_only=True)`` with the ``TRAINING_FILE_GLOBALS`` allow-list, else refused unless
    ``trusted``."""
    return _load_training_file(path, trusted=trusted, what=what)[0]


def _latest_ckpt(work: Path) -> Path | None:
    """The newest full PTL state in ``work``: last.ckpt, else the highest checkpoint_<epoch>.ckpt."""
    last = work / "last.ckpt"
    if last.exists():
        return last
    numbered = sorted(work.glob("checkpoint_*.ckpt"), key=lambda p: int(p.stem.split("_")[1])
                      if p.stem.split("_")[1].isdigit() else -1)
    return numbered[-1] if numbered else None


def _timer_elapsed_s(state: dict[str, Any]) -> float:
    """Training seconds PyTorch Lightning's Timer had counted when ``state`` (a loaded .ckpt) was saved."""
    elapsed = (state.get("callbacks") or {}).get("Timer", {}).get("time_elapsed", {})
    return float(elapsed.get("train", 0.0))


def _global_step(work: Path, *, trusted: bool = False) -> int | None:
    """Optimizer steps done, from the work folder's newest full state (None when there is none). A file outside the
    allow-list is refused (CheckpointError), not skipped."""
    last = _latest_ckpt(work)
    if last is None:
        return None
    return int(load_training_file(last, trusted=trusted).get("global_step", 0))

