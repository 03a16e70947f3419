"""Which backends the benchmark runs: every artifact earlier notebooks left in the output folder, named and
described as ``BackendSpec`` rows (``collect_backends``); converted .tflite files are found by their sidecars
(``nailkit.runtime.discovery.find_tflite_artifacts``: checkpoint, route, precision, resolution, export options and the
file's sha256), never converted unless asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from nailkit.bench.backends import BackendSpec, cached_model
from nailkit.export.onnx import ensure_onnx
from nailkit.export.variants import ensure_torchscript, export_detection_only_onnx
from nailkit.model.build import resolve_checkpoint, validate_resolution
from nailkit.runtime.discovery import find_tflite_artifacts
from nailkit.tflite.convert import ensure_tflite
from nailkit.tflite.options import STATIC_PRECISIONS


def converted_tflite(output_dir: str | Path, checkpoint_sha256: str, route: str, precision: str, resolution: int,
                     **options: Any) -> Optional[Path]:
    """The newest .tflite that ``nailkit.tflite.convert.ensure_tflite`` already wrote under ``<output_dir>/tflite``
    for this checkpoint / route / precision / resolution and export ``options`` (``sampling`` "grid"/None = default,
    ``mask_queries`` None = all queries), its sha256 still the sidecar's; None when there is none. Never converts."""
    found, _ = find_tflite_artifacts(Path(output_dir) / "tflite", checkpoint_sha256, route=route, precision=precision,
                                     resolution=resolution, options=options)
    return max((f["path"] for f in found), key=lambda p: p.stat().st_mtime) if found else None


def collect_backends(checkpoint: str | Path, output_dir: str | Path, *, resolutions: Sequence[int] = (432,),
                     tflite_routes: Sequence[str] = ("onnx2tf", "litert"),
                     precisions: Sequence[str] = ("fp32", "fp16", "int8"),
                     sweep_kinds: Sequence[str] = ("torch", "onnxruntime"),
                     convert_sweep_tflite: bool = False, detection_only: bool = True, torchscript: bool = True,
                     tent_routes: Sequence[str] = (), xnn_routes: Sequence[str] = (),
                     xnn_precisions: Sequence[str] = (),
                     mask_queries: Optional[int] = None,
                     mask_query_kinds: Sequence[str] = ("torch", "onnxruntime"), convert_variants: bool = False,
                     rf=None, log: Optional[Callable[[str], None]] = None
                     ) -> tuple[list[BackendSpec], dict[str, Any]]:
    """Every backend of the benchmark, reusing artifacts earlier notebooks left in ``output_dir``.

    * at the model's resolution: PyTorch eager, PyTorch traced (rfdetr ``inference(compile=True)``), the saved
      TorchScript ``.pt``, ORT fp32 (``ensure_onnx``: cached by notebook 03), and every TFLite route × precision
      that ``ensure_tflite`` already converted (``converted_tflite``: never converts);
    * at each other resolution: ``sweep_kinds`` among torch / onnxruntime / tflite-litert (route B fp32: converted
      only when ``convert_sweep_tflite``, ~2-3 min each on 2 cores) / tflite-onnx2tf (cached only);
    * detection-only: PyTorch and ORT without the segmentation head;
    * ``tent_routes``: the fp32 TFLite of each route with the gather-free tent sampler (``sampling="tent"``), named
      ``tflite <route> fp32 tent``; ``xnn_routes``: the same with the query selection and sine embedding kept on
      XNNPACK too (``sampling="xnn"``, ``nailkit.model.xnnpack_friendly``), named ``tflite <route> fp32 xnn``, and its
      static int8 files for ``xnn_precisions`` (``w8a8``/``w8a16``, route B), named ``tflite litert w8a8 xnn``;
      route B's static int8 precisions (``w8a8``, ``w8a16`` in ``precisions``) are quantised from the cached fp32 file
      when missing and ``convert_variants`` (``ensure_tflite``: ~1 min calibration + its parity run);
      ``mask_queries=N``: masks for the N best queries only, one row per
      ``mask_query_kinds`` (torch, onnxruntime, tflite-litert, tflite-onnx2tf), named ``... mqN``. TFLite variants are
      converted (``ensure_tflite``) only when ``convert_variants`` and the route is litert (onnx2tf: cached only);
      the ONNX variant is exported and verified by ``ensure_onnx`` (cached).

    Returns (specs, notes): ``notes['missing']`` lists what was asked for but has no artifact yet. ``log`` (None:
    silent; the CLI and notebook 06 pass ``print``) gets a line before each step that takes a while.
    """
    log = log or (lambda _line: None)
    ckpt = resolve_checkpoint(checkpoint)
    out = Path(output_dir)
    rf = rf or cached_model(ckpt)
    base = int(rf.model.resolution)
    sha = ckpt.sha256()
    res_list = [validate_resolution(rf, r) for r in resolutions]
    if base not in res_list:
        res_list.insert(0, base)
    specs: list[BackendSpec] = []
    notes: dict[str, Any] = {"missing": [], "checkpoint_sha256": sha, "base_resolution": base}

    def onnx_spec(r: int, name: str) -> Optional[BackendSpec]:
        log(f"ONNX at {r} (cached by notebook 03 when it exists) ...")
        try:
            # Lower resolutions: ensure_onnx's raw max-abs gate fails on a TopK near-tie of the random-weight demo
            # (at 336, 2 of 200 queries swap on one photo while all top-10 detections match), so those files are
            # judged by this benchmark's own detection-level drift instead (``drift`` in the result).
            path, meta = ensure_onnx(ckpt, out, resolution=r, rf=rf, verify=(r == base))
        except (RuntimeError, ValueError) as exc:  # e.g. its parity gate failed: report, keep benchmarking
            if r == base:
                raise
            notes["missing"].append(f"{name}: {str(exc).splitlines()[0][:300]}")
            return None
        return BackendSpec(name, "onnxruntime", str(path), r, meta={"route": "ort", "precision": "fp32"})

    specs.append(BackendSpec("pytorch eager", "torch", str(ckpt), base, meta={"route": "torch"}))
    specs.append(BackendSpec("pytorch traced", "torch-traced", str(ckpt), base,
                             meta={"route": "torch", "how": "rfdetr inference(compile=True)"}))
    if torchscript:
        pt, pt_meta = ensure_torchscript(rf, ckpt, out / "variants")
        specs.append(BackendSpec("torchscript .pt", "torchscript", str(pt), base,
                                 meta={"route": "torchscript", "workaround": pt_meta.get("workaround")}))
        notes["torchscript"] = pt_meta
    specs.append(onnx_spec(base, "onnxruntime fp32"))

    for route in tflite_routes:
        for prec in precisions:
            if prec in STATIC_PRECISIONS and route != "litert":
                continue  # static selective int8 is route B's (ai-edge-quantizer on the litert file)
            f = converted_tflite(out, sha, route, prec, base)
            if f is None and prec in STATIC_PRECISIONS and convert_variants:
                log(f"quantising route B {prec} (static, calibrated on the train split) ...")
                f, _ = ensure_tflite(ckpt, out, route="litert", precision=prec, resolution=base)
            if f is None:
                notes["missing"].append(f"tflite {route} {prec} @{base}: not converted yet (notebook 04 / "
                                        f"`python -m nailkit convert`)")
                continue
            specs.append(BackendSpec(f"tflite {route} {prec}", "tflite", str(f), base,
                                     meta={"route": route, "precision": prec}))
    for r in res_list:
        if r == base:
            continue
        for kind in sweep_kinds:
            if kind == "torch":
                specs.append(BackendSpec(f"pytorch eager @{r}", "torch", str(ckpt), r, meta={"route": "torch"}))
            elif kind == "onnxruntime":
                spec = onnx_spec(r, f"onnxruntime fp32 @{r}")
                if spec is not None:
                    specs.append(spec)
            elif kind.startswith("tflite-"):
                route = kind.split("-", 1)[1]
                f = converted_tflite(out, sha, route, "fp32", r)
                if f is None and convert_sweep_tflite and route == "litert":
                    log(f"converting route B fp32 at {r} (litert-torch) ...")
                    f, _ = ensure_tflite(ckpt, out, route="litert", precision="fp32", resolution=r)
                if f is None:
                    notes["missing"].append(f"tflite {route} fp32 @{r}: not converted")
                    continue
                specs.append(BackendSpec(f"tflite {route} fp32 @{r}", "tflite", str(f), r,
                                         meta={"route": route, "precision": "fp32"}))
            else:
                raise ValueError(f"unknown sweep kind {kind!r}; expected torch, onnxruntime, tflite-litert, "
                                 f"tflite-onnx2tf")
    def tflite_variant(route: str, name: str, **opts: Any) -> None:
        f = converted_tflite(out, sha, route, "fp32", base, **opts)
        if f is None and convert_variants and route == "litert":
            log(f"converting route B fp32 {opts} (litert-torch) ...")
            f, _ = ensure_tflite(ckpt, out, route="litert", precision="fp32", resolution=base, **opts)
        if f is None:
            notes["missing"].append(f"{name}: not converted (`python -m nailkit convert --route {route} --precision "
                                    f"fp32" + "".join(f" --{k.replace('_', '-')} {v}" for k, v in opts.items()) + "`)")
            return
        specs.append(BackendSpec(name, "tflite", str(f), base, meta={"route": route, "precision": "fp32", **opts}))

    for route in tent_routes:
        tflite_variant(route, f"tflite {route} fp32 tent", sampling="tent")
    for route in xnn_routes:
        tflite_variant(route, f"tflite {route} fp32 xnn", sampling="xnn")
        for prec in [p for p in xnn_precisions if p in STATIC_PRECISIONS and route == "litert"]:
            # static int8 of the xnn graph: the int8 backbone and a decoder that stays on XNNPACK
            f = converted_tflite(out, sha, route, prec, base, sampling="xnn")
            if f is None and convert_variants:
                log(f"quantising route B {prec} of the xnn graph ...")
                f, _ = ensure_tflite(ckpt, out, route="litert", precision=prec, resolution=base, sampling="xnn")
            if f is None:
                notes["missing"].append(f"tflite {route} {prec} xnn: not converted")
                continue
            specs.append(BackendSpec(f"tflite {route} {prec} xnn", "tflite", str(f), base,
                                     meta={"route": route, "precision": prec, "sampling": "xnn"}))
    if mask_queries is not None:
        n = int(mask_queries)
        for kind in mask_query_kinds:
            if kind == "torch":
                specs.append(BackendSpec(f"pytorch eager mq{n}", "torch", str(ckpt), base,
                                         meta={"route": "torch", "mask_queries": n}))
            elif kind == "onnxruntime":
                log(f"ONNX with masks for the top {n} queries (ensure_onnx, verified) ...")
                path, _ = ensure_onnx(ckpt, out, resolution=base, rf=rf, mask_queries=n)
                specs.append(BackendSpec(f"onnxruntime fp32 mq{n}", "onnxruntime", str(path), base,
                                         meta={"route": "ort", "precision": "fp32", "mask_queries": n}))
            elif kind.startswith("tflite-"):
                route = kind.split("-", 1)[1]
                tflite_variant(route, f"tflite {route} fp32 mq{n}", mask_queries=n)
            else:
                raise ValueError(f"unknown mask-query kind {kind!r}; expected torch, onnxruntime, tflite-litert, "
                                 f"tflite-onnx2tf")
    if detection_only:
        specs.append(BackendSpec("pytorch eager det-only", "torch", str(ckpt), base, segmentation=False,
                                 meta={"route": "torch"}))
        log("detection-only ONNX ...")
        det = export_detection_only_onnx(rf, ckpt, out / "variants", base)
        specs.append(BackendSpec("onnxruntime fp32 det-only", "onnxruntime", str(det), base, segmentation=False,
                                 meta={"route": "ort", "precision": "fp32"}))
    return specs, notes
