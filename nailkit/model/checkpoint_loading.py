"""Loading a checkpoint file safely: ``torch.load(weights_only=True)`` first; arbitrary pickled objects are only
unpickled when the caller says the file is trusted. Files that are not checkpoints (JSON, ONNX, TFLite, text), empty,
truncated or corrupt are refused with a ``CheckpointError`` that names the file and what was expected.

``state_dict_of`` and ``args_of`` take the weights and the stored training args out of a loaded checkpoint.
"""

from __future__ import annotations

import argparse
import os
import pickle
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from nailkit.core.errors import first_line


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with a message naming the file and what was expected."""


def _sniff(path: Path) -> str | None:
    """Return a human description of what a non-checkpoint file looks like, or None if it may be a checkpoint."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None  # torch zip archive or legacy pickle
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "a JSON/text file"
    if head[:1] == b"\x08" and (b"onnx" in head.lower() or b"pytorch" in head.lower()):
        return "an ONNX model"  # ModelProto: field 1 (ir_version) first, then the producer name
    if head[4:8] == b"TFL3":
        return "a TFLite model"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "an unknown binary file"


def load_checkpoint(path: str | os.PathLike[str], *, trusted: bool = False) -> dict[str, Any]:
    """Load a checkpoint safely and return it as a dict.

    ``torch.load(weights_only=True)`` first, with rfdetr's Namespace types allowed. Only if the file holds other
    Python objects *and* ``trusted=True`` is it fully unpickled. A bare state_dict is returned as ``{"model": sd}``.

    Raises:
        CheckpointError: missing, empty, truncated, not a checkpoint, or untrusted pickled objects.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file. Expected an rfdetr checkpoint (.pth) such as "
                              f"checkpoint_best_total.pth, or leave the path empty to use the built-in demo.")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected an rfdetr checkpoint file (.pth).")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty (0 bytes); expected an rfdetr checkpoint (.pth).")
    kind = _sniff(path)
    if kind is not None:
        raise CheckpointError(f"{path}: this is {kind}, not a PyTorch checkpoint. Expected a .pth written by "
                              f"torch.save, e.g. rfdetr's checkpoint_best_total.pth.")
    try:
        with torch.serialization.safe_globals([argparse.Namespace, types.SimpleNamespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        damage = _zip_damage(path) if zipfile_like(path) else None
        if damage:  # a damaged file, not an untrusted one: --trusted would not help
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({damage}). Expected a complete .pth "
                                  f"written by torch.save; re-copy or re-download the file.") from None
        if not trusted:
            raise CheckpointError(
                f"{path}: holds Python objects that weights_only loading refuses ({first_line(exc)}). "
                f"Unpickling can run arbitrary code: pass trusted=True (CLI: --trusted) only if you trust this file."
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointError(f"{path}: could not be unpickled even as trusted: {first_line(exc2)}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        msg = first_line(exc)
        if "zip" in msg.lower() or "central directory" in msg.lower() or isinstance(exc, EOFError):
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({msg}). Expected a complete .pth "
                                  f"written by torch.save; re-copy or re-download the file.") from None
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({msg}).") from None
    if isinstance(obj, dict) and obj and all(_is_tensor(v) for v in obj.values()):
        return {"model": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("model", obj.get("state_dict")), dict):
        raise CheckpointError(f"{path}: loaded a {type(obj).__name__}, expected a dict with a 'model' state_dict "
                              f"(rfdetr format) or a bare state_dict of tensors.")
    return obj


def _zip_damage(path: Path) -> str | None:
    """Why a zip-format .pth is damaged (bad CRC, unreadable member, not a zip), or None when it reads cleanly."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as exc:
        return f"not a readable zip archive: {first_line(exc, 120)}"
    return f"member {bad} fails its CRC check" if bad else None


def zipfile_like(path: Path) -> bool:
    """Whether ``path`` starts like a zip archive (torch.save's format since 1.6)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _is_tensor(v: Any) -> bool:
    import torch

    return isinstance(v, torch.Tensor)


def state_dict_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The model state_dict of a loaded checkpoint, with any DataParallel ``module.`` prefix removed."""
    sd = ckpt.get("model", ckpt.get("state_dict"))
    if not isinstance(sd, dict):
        raise CheckpointError("checkpoint has no 'model' state_dict")
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        sd = OrderedDict((k[len("module."):], v) for k, v in sd.items())
    return sd


def args_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The stored training args as a plain dict ({} when absent). Accepts Namespace, SimpleNamespace or dict."""
    args = ckpt.get("args")
    if args is None:
        return {}
    if isinstance(args, dict):
        return dict(args)
    if hasattr(args, "__dict__"):
        return dict(vars(args))
    return {}
