"""TFLite conversion, two routes, three precisions, with caching, verification and a delegation report.

* Route A ``onnx2tf`` (``nailkit.tflite.route_onnx2tf``): checkpoint → verified ONNX → the needed ONNX passes + the
  selection outputs → onnx2tf → ``*_float32`` / ``*_float16`` .tflite, plus dynamic-range int8 from the SavedModel with
  ``TFLiteConverter``. Optional full-integer int8 (calibrated on ``data/``) behind ``full_int8=True``.
* Route B ``litert`` (``nailkit.tflite.route_litert``): the export-mode module (wrapped to take NHWC input) →
  ``litert_torch.convert``; fp16 and dynamic int8 through ai-edge-quantizer recipes; **static selective int8**
  (``nailkit.tflite.static_int8``: ``w8a8`` / ``w8a16``, the backbone at int8, the rest in float), calibrated on
  ``calibration`` images of a train split with ``predict()``'s preprocessing.

Every conversion runs in its own subprocess (``nailkit.tflite.launch.run_worker`` → ``python -m nailkit.tflite.workers``),
with its output captured to a log file under ``outputs/logs/``; wall time and the child's peak RSS are recorded.
``ensure_tflite`` keeps each file in a staging folder until its parity gate (``nailkit.tflite.gate``,
``nailkit.verify.gates``) has passed, then publishes it with its sidecar (``nailkit.core.artifacts``); a file under its
final name has always passed its gate. The routes, precisions and defaults are ``nailkit.tflite.options``.

Outputs are identified by shape and meaning (``nailkit.portable.io_contract``), never by position: the int8 file orders them
differently. Every artifact also carries the selection tensors ``enc_scores`` / ``topk_indices`` (see
``nailkit.verify.parity.selection_aware_parity``). Tables and plots of these results: ``nailkit.report.tables``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

from nailkit.core import artifacts
from nailkit.core.artifacts import atomic_write, file_sha256
from nailkit.model.build import (
    DEFAULT_OUTPUT_DIR,
    export_options,
    export_suffix,
    normalize_sampling,
    resolve_checkpoint,
)
from nailkit.model.checkpoint import Checkpoint, checkpoint_content
from nailkit.portable.io_contract import check_tflite_file
from nailkit.tflite import launch
from nailkit.tflite.gate import gate_and_publish, raise_if_refused
from nailkit.tflite.launch import ConversionError
from nailkit.tflite.options import (
    checkpoint_info,
    DEFAULT_CALIBRATION,
    DEFAULT_PATH_WHY,
    default_path,
    default_precisions,
    EMBEDDED_METADATA,
    PRECISIONS,
    REPORTED_NOT_GATED,
    resolution_of,
    ROUTE_A_PASSES,
    ROUTE_PACKAGES,
    route_precisions,
    ROUTES,
    STATIC_PRECISIONS,
)
from nailkit.tflite.route_litert import convert_route_b
from nailkit.tflite.route_onnx2tf import convert_route_a, key_params
from nailkit.tflite.static_int8 import ensure_static


def _artifact_dir(out_dir: Path, route: str, res: int, h: str, suffix: str = "") -> Path:
    return out_dir / "tflite" / f"{route}_{res}{suffix}_{h}"


def ensure_tflite(checkpoint: str | os.PathLike[str] | None, output_dir: str | os.PathLike[str] | None = None,
                  route: str = "onnx2tf", precision: str = "fp32", resolution: int | None = None, *,
                  also: tuple[str, ...] = (), force: bool = False, passes: tuple[str, ...] | None = None,
                  verify: bool = True, sampling: str | None = None, mask_queries: int | None = None,
                  calibration: int = DEFAULT_CALIBRATION, calibration_dir: str | os.PathLike[str] | None = None
                  ) -> artifacts.Artifact:
    """The ``.tflite`` of ``checkpoint`` for ``route``/``precision`` (an ``Artifact``: ``path, meta = ...``),
    converting only when the cache misses, and publishing a file only after its parity gate passed.

    The key (``nailkit.core.artifacts``) is the checkpoint's content + route + resolution + passes + converter settings
    and versions; the sidecar ``<file>.tflite.json`` records it with the file's sha256, the conversion's wall time,
    the child's peak RSS, the log path and the gate's aggregate (``parity``). ``verify=True`` runs the gate of
    ``nailkit.verify.gates`` (stage ``tflite_<precision>``; full_int8 is reported, not gated) on the converted file before
    it is published; a failure raises ``ConversionError`` and publishes nothing. Route A converts fp32 and fp16
    together (onnx2tf writes both) plus any precision in ``also``, and keeps onnx2tf's SavedModel so that int8 /
    full_int8 asked for later are made from it without a second onnx2tf run. Route B converts fp32 with litert-torch;
    fp16/int8 are quantized from the cached fp32 file (``made_from`` in the meta). ``passes`` (route A) overrides
    ``ROUTE_A_PASSES`` — e.g. ``()`` to show what a pass is needed for.

    ``sampling`` ("grid" default | "tent": gather-free deformable sampling, ``nailkit.model.sampling``) and ``mask_queries``
    (None = masks for all queries | N: in-graph top-N before the mask head) are ``nailkit.model.build.export_module``'s
    options, for both routes; they enter the key (and the folder name) only when not the default, so a tent or top-N
    file is never served for a default request. The fp32 gate of a tent file compares it with the default
    (grid_sample) PyTorch module; a top-N file is compared with the top-N PyTorch module. Tolerances unchanged.

    A precision that fails its gate leaves a refusal record (``<file>.refused.json``: key + failures,
    ``nailkit.core.artifacts.record_refusal``); a later request for the same key raises ``ConversionError`` from that
    record at once, without converting again (route A's fp16 of the trained model: ~20 min of onnx2tf each time),
    unless ``force=True``.

    Route B's static precisions (``STATIC_PRECISIONS``: ``w8a8``, ``w8a16``) are quantised from the cached fp32 file
    (``nailkit.tflite.static_int8.ensure_static``), calibrated on ``calibration`` images of ``calibration_dir`` (a COCO
    split folder; default: the synthetic dataset's train split, seed 0, generated under ``output_dir/datasets/``); the
    names of those images and the sha256 of their preprocessed inputs enter the file's key. Their parity is reported,
    not gated (see ``STATIC_PRECISIONS``).
    """
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
    valid = route_precisions(route)
    for p in (precision, *also):
        if p not in valid:
            raise ValueError(f"route {route}: unknown precision {p!r}; expected one of {valid}")
    out_dir = Path(output_dir) if output_dir else DEFAULT_OUTPUT_DIR
    ckpt = resolve_checkpoint(checkpoint, out_dir)
    if not ckpt.path.is_file():
        raise FileNotFoundError(f"{ckpt}: checkpoint not found (expected an rfdetr .pth)")
    res = resolution_of(ckpt, resolution)
    sampling = normalize_sampling(sampling)
    opts = export_options(sampling, mask_queries)
    mask_queries = opts.get("mask_queries")
    params: dict[str, Any] = {"route": route, "resolution": res, "selection_outputs": True, "input": "NHWC",
                              "verified": bool(verify), "embedded_metadata": EMBEDDED_METADATA, **opts}
    if route == "onnx2tf":
        passes = tuple(ROUTE_A_PASSES if passes is None else passes)
        params.update(key_params(passes))
    h, key = artifacts.artifact_key("tflite", checkpoint_content(ckpt), params, ROUTE_PACKAGES[route])
    adir = _artifact_dir(out_dir, route, res, h, export_suffix(sampling, mask_queries))
    # route B's quantised files are made from the cached, gated fp32 file of the same options
    fp32 = functools.partial(ensure_tflite, ckpt, out_dir, "litert", "fp32", res, verify=verify, sampling=sampling,
                             mask_queries=mask_queries)
    if precision in STATIC_PRECISIONS:
        return ensure_static(ckpt, out_dir, adir, key, precision, res,
                             also=tuple(p for p in also if p in STATIC_PRECISIONS), force=force, verify=verify,
                             sampling=sampling, mask_queries=mask_queries, calibration=calibration,
                             calibration_dir=calibration_dir, fp32=fp32)
    return _convert_and_publish(ckpt, out_dir, adir, h, key, route, precision, res, opts,
                                also=tuple(p for p in also if p not in STATIC_PRECISIONS), force=force, verify=verify,
                                passes=passes, sampling=sampling, mask_queries=mask_queries, fp32=fp32)


def _convert_and_publish(ckpt: Checkpoint, out_dir: Path, adir: Path, h: str, key: dict[str, Any], route: str,
                         precision: str, res: int, opts: dict[str, Any], *, also: tuple[str, ...], force: bool,
                         verify: bool, passes: tuple[str, ...] | None, sampling: str, mask_queries: int | None,
                         fp32: Callable[[], artifacts.Artifact]) -> artifacts.Artifact:
    """``ensure_tflite`` for a non-static precision once its key is known: the cached file, or a conversion (with the
    other precisions of ``also``) into a staging folder, each file gated, then published or refused."""
    path = adir / f"model_{precision}.tflite"
    if not force:
        meta = artifacts.cached(path, key)
        if meta:
            return artifacts.Artifact(path, meta)
        raise_if_refused(path, key, route, precision)
    wanted = [precision, *[a for a in also if a != precision]]
    if route == "onnx2tf":  # onnx2tf always writes fp32; fp16 only when asked (see nailkit.tflite.workers)
        wanted = list(dict.fromkeys(["fp32", *wanted]))
    info = checkpoint_info(ckpt)
    log_path = out_dir / "logs" / f"convert_{route}_{res}_{h}_{'-'.join(wanted)}.log"
    with artifacts.staging(path) as wp:
        if route == "onnx2tf":
            result, extra = convert_route_a(ckpt, out_dir, adir, key, res, wanted, wp, log_path, passes=passes,
                                            sampling=sampling, mask_queries=mask_queries)
        else:
            result, extra = convert_route_b(ckpt, res, wanted, wp, log_path, sampling=sampling,
                                            mask_queries=mask_queries, fp32=fp32)
        metas, refused = gate_and_publish(result, extra, ckpt, adir, key, route, res, info, opts, log_path,
                                          verify=verify, sampling=sampling, mask_queries=mask_queries)
    if precision in refused:
        raise ConversionError(f"{path}: route {route} {precision} FAILED its parity gate and was not published: "
                              + "; ".join(refused[precision]) + f" (log: {log_path})")
    if precision not in metas:
        raise ConversionError(f"route {route}: the conversion wrote no {precision} file (got {sorted(metas)}); "
                              f"see {log_path}")
    return artifacts.Artifact(path, metas[precision])


def delegation_report(path: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None
                      ) -> dict[str, Any]:
    """Op histogram and XNNPACK coverage of a .tflite (measured in a subprocess; cached next to the file, keyed by
    the .tflite's sha256 and the runtime's version)."""
    p = check_tflite_file(path)
    side = p.with_suffix(".delegation.json")
    key = {"tflite_sha256": file_sha256(p, 64), "versions": artifacts.package_versions(("ai-edge-litert",))}
    try:
        rep = json.loads(side.read_text())
        if rep.get("key") == key:
            return rep
    except (OSError, ValueError):
        pass
    out_dir = Path(output_dir) if output_dir else DEFAULT_OUTPUT_DIR
    rep = launch.run_worker(["delegation", str(p)], out_dir / "logs" / f"delegation_{p.parent.name}_{p.stem}.log",
                            f"delegation {p.name}")
    rep.pop("wall_s", None)
    rep.pop("peak_rss_mb", None)
    rep["key"] = key
    atomic_write(side, lambda tmp: tmp.write_text(json.dumps(rep, indent=1)))
    return rep


def cli_convert(args) -> int:
    """checkpoint → ONNX → TFLite for each precision; each file is published only after its gate passed."""
    out_dir = Path(args.out)
    ckpt = resolve_checkpoint(args.checkpoint, out_dir, trusted=getattr(args, "trusted", False))
    if not ckpt.path.is_file():
        raise FileNotFoundError(f"{ckpt}: checkpoint not found (expected an rfdetr .pth)")
    args.route, args.sampling = default_path(args.route, getattr(args, "sampling", None))
    precisions = list(args.precision) if args.precision else default_precisions()
    if not args.precision:
        print(f"defaults: route {args.route}, sampling {args.sampling}, precision {','.join(precisions)} "
              f"({DEFAULT_PATH_WHY})", flush=True)
    for p in precisions:
        if p not in route_precisions(args.route):
            raise ValueError(f"--precision {p}: expected a comma list of {PRECISIONS} (+ full_int8 on route onnx2tf, "
                             f"{'/'.join(STATIC_PRECISIONS)} on route litert)")
    redone: set[str] = set()  # --force converts each file once, not once per precision of a joint conversion
    for prec in precisions:
        path, meta = ensure_tflite(ckpt, out_dir, args.route, prec, args.resolution, also=tuple(precisions),
                                   sampling=getattr(args, "sampling", None),
                                   mask_queries=getattr(args, "mask_queries", None),
                                   calibration=int(getattr(args, "calibration", None) or DEFAULT_CALIBRATION),
                                   calibration_dir=getattr(args, "calibration_dir", None),
                                   force=bool(getattr(args, "force", False)) and prec not in redone)
        redone |= set(meta.get("converted_together", [prec]))
        a = meta["parity"]
        tag = export_suffix(meta.get("sampling"), meta.get("mask_queries")).replace("_", " ").strip()
        line = (f"{args.route} {prec}{' (' + tag + ')' if tag else ''}: {path} ({meta['bytes'] / 1e6:.1f} MB, "
                f"converted in "
                f"{meta['conversion_wall_s']:.0f} s, peak RSS {meta['conversion_peak_rss_mb']:.0f} MB) "
                f"pre-TopK {a['pre_topk_max_abs']:.1e}, forced {a['forced_max_abs']:.1e}")
        if "control_ratio_max" in a:
            line += f", vs rounding control {a['control_ratio_max']:.2f}x"
        print(line + (" — reported, not gated" if prec in REPORTED_NOT_GATED else " — ok"))
    return 0
