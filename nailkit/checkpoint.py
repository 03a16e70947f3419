"""Inspect an RF-DETR checkpoint: architecture from tensor shapes, cross-checked against stored args.

Shapes are the source of truth. ``args`` (argparse.Namespace, SimpleNamespace or dict) is only a cross-check, and
every disagreement between the two is reported. Loading is ``weights_only=True`` first; arbitrary pickled objects are
only unpickled when the caller says the file is trusted.

Also builds the deterministic demo checkpoint (``make_demo_checkpoint``): rfdetr's own checkpoint format, the seed's
exact architecture (RFDETRSegPreview, 2 classes), random weights.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import types
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nailkit.artifacts import atomic_write, file_sha256  # noqa: F401  (re-exported: train.py, notebooks 05/06)

#: Class names written into the demo checkpoint: 2 classes, as in the researcher's nail dataset.
DEMO_CLASS_NAMES = ["background", "Nail"]
DEMO_SEED = 0

#: DINOv2 width → rfdetr encoder name.
ENCODER_BY_DIM = {384: "dinov2_windowed_small", 768: "dinov2_windowed_base"}

#: rfdetr segmentation classes, keyed by what tells them apart in the weights.
#: (patch, resolution, num_queries, dec_layers) → class name. SegPreview and SegMedium differ only in decoder layers.
SEG_CLASSES = {
    (12, 432, 200, 4): "RFDETRSegPreview",
    (12, 432, 200, 5): "RFDETRSegMedium",
    (12, 312, 100, 4): "RFDETRSegNano",
    (12, 384, 100, 4): "RFDETRSegSmall",
    (12, 504, 200, 5): "RFDETRSegLarge",
    (12, 624, 300, 6): "RFDETRSegXLarge",
}

_POS_KEY = re.compile(r"(^|\.)embeddings\.position_embeddings$")
_PATCH_KEY = re.compile(r"(^|\.)patch_embeddings\.projection\.weight$")
_DEC_LAYER_KEY = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with a message naming the file and what was expected."""


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
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
    import pickle

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
        if not trusted:
            raise CheckpointError(
                f"{path}: holds Python objects that weights_only loading refuses ({_first_line(exc)}). "
                f"Unpickling can run arbitrary code: pass trusted=True (CLI: --trusted) only if you trust this file."
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - re-raised with the file name
            raise CheckpointError(f"{path}: could not be unpickled even as trusted: {_first_line(exc2)}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        msg = _first_line(exc)
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _is_tensor(v: Any) -> bool:
    import torch

    return isinstance(v, torch.Tensor)


def state_dict_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The model state_dict of a loaded checkpoint, with any DataParallel ``module.`` prefix removed."""
    sd = ckpt.get("model", ckpt.get("state_dict"))
    if not isinstance(sd, dict):
        raise CheckpointError("checkpoint has no 'model' state_dict")
    if sd and all(k.startswith("module.") for k in sd):
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


# --------------------------------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class CheckpointReport:
    """What a checkpoint holds. ``sources`` says where each value came from: 'shape', 'args' or 'default'."""

    path: str
    encoder: str | None
    patch_size: int | None
    resolution: int | None
    hidden_dim: int | None
    num_queries: int | None
    group_detr: int | None
    total_queries: int | None
    dec_layers: int
    num_classes: int | None
    num_logits: int | None
    class_names: list[str] | None
    segmentation_head: bool
    num_windows: int | None
    rfdetr_class: str | None
    num_params: dict[str, int]
    key_tensors: dict[str, list[int]]
    sources: dict[str, str] = field(default_factory=dict)
    disagreements: list[str] = field(default_factory=list)
    extra_keys: list[str] = field(default_factory=list)
    format: str = "rfdetr"

    # ---- rendering -------------------------------------------------------------------------------------------------
    def summary_lines(self) -> list[str]:
        nq = self.num_queries
        names = " + ".join(self.class_names) if self.class_names else "names not stored"
        line1 = (f"Encoder {self.encoder} · Num queries {nq} (actual {self.total_queries} with group_detr="
                 f"{self.group_detr}) · Patch size {self.patch_size}")
        line2 = (f"Resolution {self.resolution}×{self.resolution} · Hidden dim {self.hidden_dim} · Num classes "
                 f"{self.num_classes} ({names}) · Segmentation head {self.segmentation_head} · Decoder layers "
                 f"{self.dec_layers}")
        wanted = ["refpoint_embed.weight", "query_feat.weight", "position_embeddings", "patch_embeddings"]
        line3 = " · ".join(f"{k} {self.key_tensors[k]}" for k in wanted if k in self.key_tensors)
        return [line1, line2, line3]

    def render(self) -> str:
        out = self.summary_lines()
        if self.disagreements:
            out.append("DISAGREEMENTS (shapes win): " + "; ".join(self.disagreements))
        return "\n".join(out)

    def config_rows(self) -> list[tuple[str, Any, str]]:
        """(field, value, source) rows for a table."""
        keys = ["encoder", "patch_size", "resolution", "hidden_dim", "num_queries", "group_detr", "dec_layers",
                "num_classes", "class_names", "segmentation_head", "num_windows", "rfdetr_class"]
        return [(k, getattr(self, k), self.sources.get(k, "")) for k in keys]

    def to_markdown(self) -> str:
        """Config table (value + where it came from), then the key-tensor table."""
        rows = ["| field | value | source |", "|---|---|---|"]
        rows += [f"| {k} | {v} | {src} |" for k, v, src in self.config_rows()]
        rows += ["", "| tensor | shape |", "|---|---|"]
        rows += [f"| `{k}` | {v} |" for k, v in self.key_tensors.items()]
        if self.disagreements:
            rows += ["", "**Disagreements (shapes win):**", *[f"- {d}" for d in self.disagreements]]
        return "\n".join(rows)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_params_total"] = sum(self.num_params.values())
        return d

    def __str__(self) -> str:
        return self.render()


def _short_key(name: str) -> str:
    if _POS_KEY.search(name):
        return "position_embeddings"
    if _PATCH_KEY.search(name):
        return "patch_embeddings"
    return name


def inspect(path_or_ckpt: str | os.PathLike[str] | dict[str, Any], *, trusted: bool = False) -> CheckpointReport:
    """Report the architecture a checkpoint encodes. Shapes are authoritative; ``args`` is a cross-check."""
    if isinstance(path_or_ckpt, dict):
        ckpt, path = path_or_ckpt, "<in-memory>"
    else:
        path = str(path_or_ckpt)
        ckpt = load_checkpoint(path_or_ckpt, trusted=trusted)
    sd = state_dict_of(ckpt)
    args = args_of(ckpt)
    fmt = "rfdetr" if "args" in ckpt else "bare state_dict"
    sources: dict[str, str] = {}
    disagreements: list[str] = []

    def shape(key: str) -> list[int] | None:
        return list(sd[key].shape) if key in sd else None

    def find(rx: re.Pattern[str]) -> str | None:
        return next((k for k in sd if rx.search(k)), None)

    pos_key, patch_key = find(_POS_KEY), find(_PATCH_KEY)
    if "refpoint_embed.weight" not in sd or "class_embed.bias" not in sd:
        raise CheckpointError(f"{path}: no 'refpoint_embed.weight'/'class_embed.bias' tensors; this is not an "
                              f"RF-DETR (LW-DETR) state_dict. Keys start with: {sorted(sd)[:5]}")

    def pick(name: str, from_shape: Any, arg_name: str | None = None, default: Any = None) -> Any:
        arg_val = args.get(arg_name or name) if args else None
        if from_shape is not None:
            sources[name] = "shape"
            if arg_val is not None and arg_val != from_shape:
                disagreements.append(f"{name}: shape says {from_shape}, args say {arg_val}")
            return from_shape
        if arg_val is not None:
            sources[name] = "args"
            return arg_val
        sources[name] = "default" if default is not None else "unknown"
        return default

    pos = shape(pos_key) if pos_key else None
    hidden_enc = pos[2] if pos else None
    encoder = pick("encoder", ENCODER_BY_DIM.get(hidden_enc) if hidden_enc else None)
    patch = pick("patch_size", shape(patch_key)[2] if patch_key else None)
    grid = math.isqrt(pos[1] - 1) if pos else None
    if pos and grid * grid != pos[1] - 1:
        disagreements.append(f"position_embeddings has {pos[1]} tokens, not 1 + a square number")
    resolution = pick("resolution", grid * patch if (grid and patch) else None)
    if args.get("positional_encoding_size") not in (None, grid) and grid:
        disagreements.append(f"positional_encoding_size: shape says {grid}, args say "
                             f"{args['positional_encoding_size']}")
    hidden = pick("hidden_dim", shape("query_feat.weight")[1] if "query_feat.weight" in sd else None)
    total_q = shape("refpoint_embed.weight")[0]
    # group_detr is not recoverable from shapes alone (only the product is); args say it, 13 is rfdetr's default.
    group = args.get("group_detr")
    if group:
        sources["group_detr"] = "args"
    else:
        group, sources["group_detr"] = 13, "default"
    if total_q % group:
        disagreements.append(f"refpoint_embed has {total_q} rows, not a multiple of group_detr={group}")
    num_queries = pick("num_queries", total_q // group)
    dec_idx = {int(m.group(1)) for k in sd if (m := _DEC_LAYER_KEY.match(k))}
    dec_layers = pick("dec_layers", (max(dec_idx) + 1) if dec_idx else None)
    num_logits = shape("class_embed.bias")[0]
    num_classes = pick("num_classes", num_logits - 1)
    seg = any(k.startswith("segmentation_head.") for k in sd)
    sources["segmentation_head"] = "shape"
    if args.get("segmentation_head") is not None and bool(args["segmentation_head"]) != seg:
        disagreements.append(f"segmentation_head: weights say {seg}, args say {args['segmentation_head']}")
    num_windows = args.get("num_windows")
    sources["num_windows"] = "args" if num_windows is not None else "unknown"
    class_names = args.get("class_names")
    if class_names is not None:
        class_names = list(class_names)
        sources["class_names"] = "args"
        if num_classes is not None and len(class_names) != num_classes:
            disagreements.append(f"class_names has {len(class_names)} names for {num_classes} classes")
    else:
        sources["class_names"] = "unknown"

    rf_class = None
    if seg:
        rf_class = SEG_CLASSES.get((patch, resolution, num_queries, dec_layers))
    elif args.get("model_name"):
        rf_class = str(args["model_name"])
    sources["rfdetr_class"] = "shape" if rf_class else "unknown"
    if rf_class is None and seg:
        disagreements.append(f"no rfdetr segmentation class matches patch={patch}, resolution={resolution}, "
                             f"queries={num_queries}, dec_layers={dec_layers}")

    num_params: dict[str, int] = {}
    for k, v in sd.items():
        top = k.split(".")[0]
        num_params[top] = num_params.get(top, 0) + int(v.numel())
    key_tensors = {}
    for k in ["refpoint_embed.weight", "query_feat.weight", pos_key, patch_key, "class_embed.weight",
              "class_embed.bias", "bbox_embed.layers.0.weight", "segmentation_head.bias"]:
        if k and k in sd:
            key_tensors[_short_key(k)] = list(sd[k].shape)
    extra = sorted(k for k in ckpt if k not in ("model", "args"))
    return CheckpointReport(
        path=path, encoder=encoder, patch_size=patch, resolution=resolution, hidden_dim=hidden,
        num_queries=num_queries, group_detr=group, total_queries=total_q, dec_layers=dec_layers,
        num_classes=num_classes, num_logits=num_logits, class_names=class_names, segmentation_head=seg,
        num_windows=num_windows, rfdetr_class=rf_class, num_params=num_params, key_tensors=key_tensors,
        sources=sources, disagreements=disagreements, extra_keys=extra, format=fmt,
    )


# --------------------------------------------------------------------------------------------------------------------
# Demo checkpoint
# --------------------------------------------------------------------------------------------------------------------
def make_demo_checkpoint(path: str | os.PathLike[str], seed: int = DEMO_SEED) -> Path:
    """Write a random-weight RFDETRSegPreview (2 classes) checkpoint in rfdetr's own format.

    The same seed gives identical tensors. Never downloads anything (``pretrain_weights=None``).
    """
    import torch

    from nailkit.model import build_rfdetr

    torch.manual_seed(seed)
    rf = build_rfdetr("RFDETRSegPreview", num_classes=len(DEMO_CLASS_NAMES))
    args = argparse.Namespace(**dict(vars(rf.model.args)))
    args.class_names = list(DEMO_CLASS_NAMES)
    args.model_name = "RFDETRSegPreview"
    args.seed = seed
    args.nailkit_demo = True
    payload = {"model": rf.model.model.state_dict(), "args": args, "epoch": 0}
    return atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))
