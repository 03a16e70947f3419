"""Inspect an RF-DETR checkpoint: architecture from tensor shapes, cross-checked against stored args.

Shapes are the source of truth. ``args`` (argparse.Namespace, SimpleNamespace or dict) is only a cross-check, and
every disagreement between the two is reported. Loading is ``weights_only=True`` first; arbitrary pickled objects are
only unpickled when the caller says the file is trusted.

``checkpoint_content`` is the hash of a checkpoint's tensors and config: the artifact cache's key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import types
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nailkit.core.artifacts import file_sha256


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
        damage = _zip_damage(path) if zipfile_like(path) else None
        if damage:  # a damaged file, not an untrusted one: --trusted would not help
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({damage}). Expected a complete .pth "
                                  f"written by torch.save; re-copy or re-download the file.") from None
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


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message, shortened at a word boundary (with "…") when longer than ``limit``."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    line = text[0]
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:") + " …"


def _zip_damage(path: Path) -> str | None:
    """Why a zip-format .pth is damaged (bad CRC, unreadable member, not a zip), or None when it reads cleanly."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as exc:
        return f"not a readable zip archive: {_first_line(exc, 120)}"
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


def inspect_checkpoint(path_or_ckpt: str | os.PathLike[str] | dict[str, Any], *, trusted: bool = False,
                       where: str | os.PathLike[str] | None = None) -> CheckpointReport:
    """Report the architecture a checkpoint encodes. Shapes are authoritative; ``args`` is a cross-check.

    ``where``: the file a loaded checkpoint dict came from (named in errors). A state_dict whose keys or tensors are
    not RF-DETR's (non-string keys, non-tensor values, tensors of the wrong rank) is a ``CheckpointError``."""
    if isinstance(path_or_ckpt, dict):
        path = str(where) if where is not None else "<in-memory>"
    else:
        path = str(path_or_ckpt)
    try:
        return _inspect(path_or_ckpt, trusted=trusted, path=path)
    except (IndexError, TypeError, AttributeError, KeyError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed RF-DETR state_dict ({type(exc).__name__}: {_first_line(exc)}); "
                              f"expected rfdetr's parameter names mapped to tensors of its shapes") from None


def _inspect(path_or_ckpt: str | os.PathLike[str] | dict[str, Any], *, trusted: bool, path: str
             ) -> CheckpointReport:
    # ~95 lines on purpose: one derivation read top to bottom, each value from the shapes the lines above found,
    # cross-checked against ``args`` as it goes (``pick``); splitting it would scatter that chain.
    if isinstance(path_or_ckpt, dict):
        ckpt = path_or_ckpt
    else:
        ckpt = load_checkpoint(path_or_ckpt, trusted=trusted)
    sd = state_dict_of(ckpt)
    _check_state_dict(sd, path)
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

    num_params, key_tensors = _sizes(sd, pos_key, patch_key)
    extra = sorted(k for k in ckpt if k not in ("model", "args"))
    return CheckpointReport(
        path=path, encoder=encoder, patch_size=patch, resolution=resolution, hidden_dim=hidden,
        num_queries=num_queries, group_detr=group, total_queries=total_q, dec_layers=dec_layers,
        num_classes=num_classes, num_logits=num_logits, class_names=class_names, segmentation_head=seg,
        num_windows=num_windows, rfdetr_class=rf_class, num_params=num_params, key_tensors=key_tensors,
        sources=sources, disagreements=disagreements, extra_keys=extra, format=fmt,
    )


def _check_state_dict(sd: dict[str, Any], path: str) -> None:
    """Parameter names mapped to tensors, or a ``CheckpointError`` naming the first entry that is not."""
    odd = next((k for k in sd if not isinstance(k, str)), None)
    if odd is not None:
        raise CheckpointError(f"{path}: state_dict key {odd!r} is a {type(odd).__name__}; expected parameter names "
                              f"(strings) mapped to tensors")
    odd = next((k for k, v in sd.items() if not _is_tensor(v)), None)
    if odd is not None:
        raise CheckpointError(f"{path}: state_dict entry {odd!r} is a {type(sd[odd]).__name__}; expected tensors")


def _sizes(sd: dict[str, Any], pos_key: str | None, patch_key: str | None
           ) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Parameter count per top-level module, and the shapes of the tensors the report names."""
    num_params: dict[str, int] = {}
    for k, v in sd.items():
        top = k.split(".")[0]
        num_params[top] = num_params.get(top, 0) + int(v.numel())
    key_tensors = {}
    for k in ["refpoint_embed.weight", "query_feat.weight", pos_key, patch_key, "class_embed.weight",
              "class_embed.bias", "bbox_embed.layers.0.weight", "segmentation_head.bias"]:
        if k and k in sd:
            key_tensors[_short_key(k)] = list(sd[k].shape)
    return num_params, key_tensors


# --------------------------------------------------------------------------------------------------------------------
# Class labels
# --------------------------------------------------------------------------------------------------------------------
def class_labels(report: CheckpointReport) -> tuple[list[str], str]:
    """The label of each class id, and where the labels come from. A checkpoint that stores no class names (rfdetr's
    COCO-pretrained and bare checkpoints) gets ``unnamed_<id>`` for every id of its class head, never COCO's 80 names
    (rfdetr's fallback); names that disagree with the head's class count are kept as stored, and the source says so."""
    n = report.num_classes
    names = list(report.class_names or [])
    if names and (n is None or len(names) == n):
        return names, "checkpoint"
    if names:
        return names, f"checkpoint ({len(names)} names for the class head's {n} classes)"
    return [f"unnamed_{i}" for i in range(int(n or 0))], \
        f"unnamed: the checkpoint stores no class names; ids 0..{int(n or 0) - 1} from its class head"


# ----------------------------------------------------------------------------------------------------------------
# content hash (the artifact cache's key)
# ----------------------------------------------------------------------------------------------------------------

def content_hash(ckpt: dict[str, Any]) -> str:
    """Hash of a loaded checkpoint's tensors (name, dtype, shape, bytes) and its stored ``args`` config: independent of
    the file's name and of ``torch.save``'s archive layout (the same weights saved under two names hash equal)."""
    h = hashlib.sha256()
    for name, t in sorted(state_dict_of(ckpt).items()):
        if not hasattr(t, "detach"):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(-1).view(_byte_dtype()).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(args_of(ckpt), sort_keys=True, default=str).encode())
    return h.hexdigest()


def checkpoint_content(checkpoint: "str | os.PathLike[str] | Checkpoint", *, trusted: bool = False,
                       length: int = 16) -> str:
    """``content_hash`` of a checkpoint, cut to ``length``: the artifact cache's key. A ``Checkpoint`` computes it
    once (pass the object down rather than its path)."""
    if isinstance(checkpoint, Checkpoint):
        return checkpoint.content[:length]
    return content_hash(load_checkpoint(checkpoint, trusted=trusted))[:length]


class Checkpoint(os.PathLike):
    """A checkpoint file resolved once, at the entry point (``nailkit.model.build.resolve_checkpoint``), and passed
    down: its path, whether its pickles may be trusted, and — each computed on first use, then kept — its content
    hash (the cache key), its file hash and its inspection report. Path-like (``open``, ``Path(ckpt)`` and
    ``str(ckpt)`` give the file), so the stages that only need the file take it as is."""

    def __init__(self, path: str | os.PathLike[str], *, trusted: bool = False) -> None:
        self.path = Path(path)
        self.trusted = bool(trusted)
        self._content: str | None = None
        self._sha256: str | None = None
        self._report: CheckpointReport | None = None
        self._args: dict[str, Any] | None = None

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, trusted={self.trusted})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Checkpoint) and self.path.resolve() == other.path.resolve()

    def __hash__(self) -> int:
        return hash(self.path.resolve())

    @property
    def name(self) -> str:
        return self.path.name

    def load(self) -> dict[str, Any]:
        """The checkpoint dict (``load_checkpoint``: weights-only unless ``trusted``); not kept (hundreds of MB)."""
        return load_checkpoint(self.path, trusted=self.trusted)

    def _fill(self, ckpt: dict[str, Any]) -> None:
        if self._content is None:
            self._content = content_hash(ckpt)
        if self._report is None:
            self._report = inspect_checkpoint(ckpt, where=self.path)
            self._report.path = str(self.path)
        if self._args is None:
            self._args = args_of(ckpt)

    @property
    def content(self) -> str:
        """``content_hash`` (64 hex digits), from one load of the file."""
        if self._content is None:
            self._fill(self.load())
        return self._content

    @property
    def report(self) -> CheckpointReport:
        """``inspect_checkpoint``'s report (architecture from shapes, cross-checked against ``args``)."""
        if self._report is None:
            self._fill(self.load())
        return self._report

    @property
    def args(self) -> dict[str, Any]:
        """The stored training config (``args_of``: rfdetr's Namespace as a dict; empty when absent)."""
        if self._args is None:
            self._fill(self.load())
        return self._args

    def sha256(self, length: int = 12) -> str:
        """sha256 of the file's bytes, cut to ``length`` (64: the full digest); hashed once."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path, 64)
        return self._sha256[:length]


def _byte_dtype():
    import torch

    return torch.uint8
