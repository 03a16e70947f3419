"""Inspecting an RF-DETR checkpoint: the architecture from tensor shapes, cross-checked against stored args, as a
``CheckpointReport`` (text, markdown and JSON renderings), and the class labels it names.

Shapes are the source of truth. ``args`` (argparse.Namespace, SimpleNamespace or dict) is only a cross-check, and
every disagreement between the two is reported.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from nailkit.core.errors import first_line
from nailkit.model.checkpoint_loading import (
    CheckpointError,
    _is_tensor,
    args_of,
    load_checkpoint,
    state_dict_of,
)

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
        raise CheckpointError(f"{path}: malformed RF-DETR state_dict ({type(exc).__name__}: {first_line(exc)}); "
                              f"expected rfdetr's parameter names mapped to tensors of its shapes") from None


@dataclass
class _Derivation:
    """The state the inspection steps share: the stored ``args`` they cross-check against, where each value came from
    ('shape', 'args', 'default' or 'unknown') and every disagreement between shapes and args, in the order found."""

    args: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    disagreements: list[str] = field(default_factory=list)

    def pick(self, name: str, from_shape: Any, arg_name: str | None = None, default: Any = None) -> Any:
        """The value the shapes give (an ``args`` value that differs is a disagreement), else ``args``', else
        ``default``; its source is recorded."""
        arg_val = self.args.get(arg_name or name) if self.args else None
        if from_shape is not None:
            self.sources[name] = "shape"
            if arg_val is not None and arg_val != from_shape:
                self.disagreements.append(f"{name}: shape says {from_shape}, args say {arg_val}")
            return from_shape
        if arg_val is not None:
            self.sources[name] = "args"
            return arg_val
        self.sources[name] = "default" if default is not None else "unknown"
        return default


def _shape(sd: dict[str, Any], key: str) -> list[int] | None:
    return list(sd[key].shape) if key in sd else None


def _find_key(sd: dict[str, Any], rx: re.Pattern[str]) -> str | None:
    return next((k for k in sd if rx.search(k)), None)


def _inspect(path_or_ckpt: str | os.PathLike[str] | dict[str, Any], *, trusted: bool, path: str
             ) -> CheckpointReport:
    """One derivation read top to bottom: each step takes its values from the shapes the steps above found, and
    cross-checks them against ``args`` as it goes (``_Derivation.pick``)."""
    if isinstance(path_or_ckpt, dict):
        ckpt = path_or_ckpt
    else:
        ckpt = load_checkpoint(path_or_ckpt, trusted=trusted)
    sd = state_dict_of(ckpt)
    _check_state_dict(sd, path)
    d = _Derivation(args_of(ckpt))
    fmt = "rfdetr" if "args" in ckpt else "bare state_dict"
    pos_key, patch_key = _find_key(sd, _POS_KEY), _find_key(sd, _PATCH_KEY)
    if "refpoint_embed.weight" not in sd or "class_embed.bias" not in sd:
        raise CheckpointError(f"{path}: no 'refpoint_embed.weight'/'class_embed.bias' tensors; this is not an "
                              f"RF-DETR (LW-DETR) state_dict. Keys start with: {sorted(sd)[:5]}")
    encoder, patch, resolution = _backbone(sd, d, pos_key, patch_key)
    hidden, total_q, group, num_queries = _queries(sd, d)
    dec_layers, num_logits, num_classes, seg = _heads(sd, d)
    num_windows, class_names = _stored_only(d, num_classes)
    rf_class = _rfdetr_class(d, seg, patch, resolution, num_queries, dec_layers)
    num_params, key_tensors = _sizes(sd, pos_key, patch_key)
    extra = sorted(k for k in ckpt if k not in ("model", "args"))
    return CheckpointReport(
        path=path, encoder=encoder, patch_size=patch, resolution=resolution, hidden_dim=hidden,
        num_queries=num_queries, group_detr=group, total_queries=total_q, dec_layers=dec_layers,
        num_classes=num_classes, num_logits=num_logits, class_names=class_names, segmentation_head=seg,
        num_windows=num_windows, rfdetr_class=rf_class, num_params=num_params, key_tensors=key_tensors,
        sources=d.sources, disagreements=d.disagreements, extra_keys=extra, format=fmt,
    )


def _backbone(sd: dict[str, Any], d: _Derivation, pos_key: str | None, patch_key: str | None
              ) -> tuple[str | None, int | None, int | None]:
    """(encoder, patch size, resolution) from the DINOv2 position and patch embeddings."""
    args = d.args
    pos = _shape(sd, pos_key) if pos_key else None
    hidden_enc = pos[2] if pos else None
    encoder = d.pick("encoder", ENCODER_BY_DIM.get(hidden_enc) if hidden_enc else None)
    patch = d.pick("patch_size", _shape(sd, patch_key)[2] if patch_key else None)
    grid = math.isqrt(pos[1] - 1) if pos else None
    if pos and grid * grid != pos[1] - 1:
        d.disagreements.append(f"position_embeddings has {pos[1]} tokens, not 1 + a square number")
    resolution = d.pick("resolution", grid * patch if (grid and patch) else None)
    if args.get("positional_encoding_size") not in (None, grid) and grid:
        d.disagreements.append(f"positional_encoding_size: shape says {grid}, args say "
                               f"{args['positional_encoding_size']}")
    return encoder, patch, resolution


def _queries(sd: dict[str, Any], d: _Derivation) -> tuple[int | None, int, int, int | None]:
    """(hidden dim, total query rows, group_detr, queries per group) from the query embeddings."""
    hidden = d.pick("hidden_dim", _shape(sd, "query_feat.weight")[1] if "query_feat.weight" in sd else None)
    total_q = _shape(sd, "refpoint_embed.weight")[0]
    # group_detr is not recoverable from shapes alone (only the product is); args say it, 13 is rfdetr's default.
    group = d.args.get("group_detr")
    if group:
        d.sources["group_detr"] = "args"
    else:
        group, d.sources["group_detr"] = 13, "default"
    if total_q % group:
        d.disagreements.append(f"refpoint_embed has {total_q} rows, not a multiple of group_detr={group}")
    num_queries = d.pick("num_queries", total_q // group)
    return hidden, total_q, group, num_queries


def _heads(sd: dict[str, Any], d: _Derivation) -> tuple[int | None, int, int | None, bool]:
    """(decoder layers, class logits, classes, whether a segmentation head is present) from the decoder and heads."""
    dec_idx = {int(m.group(1)) for k in sd if (m := _DEC_LAYER_KEY.match(k))}
    dec_layers = d.pick("dec_layers", (max(dec_idx) + 1) if dec_idx else None)
    num_logits = _shape(sd, "class_embed.bias")[0]
    num_classes = d.pick("num_classes", num_logits - 1)
    seg = any(k.startswith("segmentation_head.") for k in sd)
    d.sources["segmentation_head"] = "shape"
    if d.args.get("segmentation_head") is not None and bool(d.args["segmentation_head"]) != seg:
        d.disagreements.append(f"segmentation_head: weights say {seg}, args say {d.args['segmentation_head']}")
    return dec_layers, num_logits, num_classes, seg


def _stored_only(d: _Derivation, num_classes: int | None) -> tuple[Any, list[str] | None]:
    """(num_windows, class names): what only ``args`` can say; the names are checked against the class count."""
    num_windows = d.args.get("num_windows")
    d.sources["num_windows"] = "args" if num_windows is not None else "unknown"
    class_names = d.args.get("class_names")
    if class_names is not None:
        class_names = list(class_names)
        d.sources["class_names"] = "args"
        if num_classes is not None and len(class_names) != num_classes:
            d.disagreements.append(f"class_names has {len(class_names)} names for {num_classes} classes")
    else:
        d.sources["class_names"] = "unknown"
    return num_windows, class_names


def _rfdetr_class(d: _Derivation, seg: bool, patch: Any, resolution: Any, num_queries: Any, dec_layers: Any
                  ) -> str | None:
    """The rfdetr class the architecture is (``SEG_CLASSES``), or the stored ``model_name`` of a detection model."""
    rf_class = None
    if seg:
        rf_class = SEG_CLASSES.get((patch, resolution, num_queries, dec_layers))
    elif d.args.get("model_name"):
        rf_class = str(d.args["model_name"])
    d.sources["rfdetr_class"] = "shape" if rf_class else "unknown"
    if rf_class is None and seg:
        d.disagreements.append(f"no rfdetr segmentation class matches patch={patch}, resolution={resolution}, "
                               f"queries={num_queries}, dec_layers={dec_layers}")
    return rf_class


def _check_state_dict(sd: dict[str, Any], path: str) -> None:
    """Parameter names mapped to tensors, or a ``CheckpointError`` naming the first entry that is not."""
    odd = next((k for k in sd if not isinstance(k, str)), None)
    if odd is not None:
        raise CheckpointError(f"{path}: state_dict key {odd!r} is of type {type(odd).__name__}; expected parameter names "
                              f"(strings) mapped to tensors")
    odd = next((k for k, v in sd.items() if not _is_tensor(v)), None)
    if odd is not None:
        raise CheckpointError(f"{path}: state_dict entry {odd!r} is of type {type(sd[odd]).__name__}; expected tensors")


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
