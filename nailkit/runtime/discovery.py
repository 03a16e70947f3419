"""Finding model files on disk: ``find_artifacts(dir)`` (every .onnx / .tflite, skipping partial files) and
``find_tflite_artifacts(dir, checkpoint_sha256)``, the .tflite files whose sidecar names this checkpoint and still
matches the file's sha256 (notebook 05 and the benchmark's ``nailkit.bench.discovery``). Never converts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from nailkit.core.artifacts import file_sha256, read_sidecar
from nailkit.model.build import normalize_sampling


def find_artifacts(artifacts_dir: str | os.PathLike[str], suffixes: Sequence[str] = (".onnx", ".tflite")
                   ) -> list[Path]:
    """Model files under ``artifacts_dir`` (recursive, sorted), skipping temp/partial files."""
    d = Path(artifacts_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                  and not p.name.startswith(".") and ".part" not in p.name)


def _precision_of(path: Path, meta: dict[str, Any]) -> str:
    if meta.get("precision"):
        return str(meta["precision"])
    stem = path.stem.lower()
    for key, names in (("int8", ("int8", "integer_quant", "dynamic_range")), ("fp16", ("fp16", "float16")),
                       ("fp32", ("fp32", "float32"))):
        if any(n in stem for n in names):
            return key
    return "fp32"


def find_tflite_artifacts(artifacts_dir: str | os.PathLike[str], checkpoint_sha256: Optional[str] = None, *,
                          route: Optional[str] = None, precision: Optional[str] = None,
                          resolution: Optional[int] = None, options: Optional[Mapping[str, Any]] = None
                          ) -> tuple[list[dict[str, Any]], list[str]]:
    """The .tflite files under ``artifacts_dir`` that belong to this checkpoint, and notes on the ones skipped: the one
    discovery of converted files (notebook 05, the benchmark). Never converts.

    A file belongs when its sidecar (``<file>.tflite.json``, written by ``nailkit.tflite.convert``) records the
    checkpoint's sha256 (prefix match: sidecars may keep a short hash) and, where the sidecar records the file's own
    sha256 (every file ``nailkit.core.artifacts.publish`` wrote), the file still has it: a file edited or replaced
    after its sidecar was written is skipped with a note. Without ``checkpoint_sha256`` every loadable file counts.
    ``route`` / ``precision`` / ``resolution`` keep only the files whose sidecar says so; ``options`` (export options,
    ``{}`` = the default graph) keeps only files made with exactly those (``sampling``: None/"grid" = default;
    ``mask_queries``: None = all queries). Only the files that pass these filters are hashed.
    Each item: ``{"path", "label", "precision", "route", "meta"}``; labels look like ``tflite:litert:fp16``; sorted by
    path.
    """
    want_options = None
    if options is not None:
        mq = options.get("mask_queries")
        want_options = (normalize_sampling(options.get("sampling")), None if mq is None else int(mq))
    found: list[dict[str, Any]] = []
    notes: list[str] = []
    for path in find_artifacts(artifacts_dir, (".tflite",)):
        meta = read_sidecar(path) or {}
        sha = str(meta.get("checkpoint_sha256") or meta.get("key", {}).get("checkpoint_sha256") or "")
        if checkpoint_sha256 and not (sha and (checkpoint_sha256.startswith(sha) or sha.startswith(checkpoint_sha256))):
            notes.append(f"{path}: skipped ({'no sidecar' if not sha else 'another checkpoint'})")
            continue
        prec = _precision_of(path, meta)
        rt = str(meta.get("route") or path.parent.name.split("_")[0] or "tflite")
        if (route is not None and rt != route) or (precision is not None and prec != precision) \
                or (resolution is not None and int(meta.get("resolution", -1)) != int(resolution)) \
                or (want_options is not None
                    and (normalize_sampling(meta.get("sampling")), meta.get("mask_queries")) != want_options):
            continue
        if meta.get("sha256") and meta["sha256"] != file_sha256(path, 64):
            notes.append(f"{path}: skipped (changed since its sidecar was written: sha256 differs)")
            continue
        options_tag = "".join(f":{t}" for t in ((meta.get("sampling") if meta.get("sampling") in ("tent", "xnn")
                                                 else ""),
                                                (f"mq{meta['mask_queries']}" if meta.get("mask_queries") else ""))
                              if t)
        found.append({"path": path, "precision": prec, "route": rt, "meta": meta,
                      "label": f"tflite:{rt}:{prec}{options_tag}"})
    labels = [f["label"] for f in found]
    for f in found:  # two files with the same route+precision (e.g. two resolutions): make the labels unique
        if labels.count(f["label"]) > 1:
            f["label"] = f"{f['label']}:{f['path'].parent.name}"
    return found, notes
