"""Which backends the benchmark runs: every artifact earlier notebooks left in the output folder, named and
described as ``BackendSpec`` rows (``collect_backends``); converted .tflite files are found by their sidecars
(``nailkit.runtime.discovery.find_tflite_artifacts``: checkpoint, route, precision, resolution, export options and the
file's sha256), never converted unless asked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from nailkit.bench.backends import BackendSpec, cached_model
from nailkit.export.onnx import ensure_onnx
from nailkit.export.variants import ensure_torchscript, export_detection_only_onnx
from nailkit.model.build import resolve_checkpoint, validate_resolution
from nailkit.model.checkpoint import Checkpoint
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

    Side effects (files written under ``output_dir``, each in a named step of ``_Collector``): the ONNX files
    (``export_onnx_spec``), the TorchScript ``.pt`` (``add_base_rows``) and the detection-only ONNX
    (``add_detection_only``) are exported when not cached yet; TFLite files are converted only where a ``convert_*``
    flag asks for it (``find_or_convert_tflite``).

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
    c = _Collector(ckpt=ckpt, out=out, rf=rf, base=base, sha=sha, log=log,
                   convert_variants=convert_variants,
                   notes={"missing": [], "checkpoint_sha256": sha, "base_resolution": base})
    c.add_base_rows(torchscript)
    c.add_tflite_grid(tflite_routes, precisions)
    c.add_resolution_sweep(res_list, sweep_kinds, convert_sweep_tflite)
    c.add_sampler_variants(tent_routes, xnn_routes, xnn_precisions)
    if mask_queries is not None:
        c.add_mask_query_rows(int(mask_queries), mask_query_kinds)
    if detection_only:
        c.add_detection_only()
    return c.specs, c.notes


@dataclass
class _Collector:
    """One ``collect_backends`` call: the checkpoint, its model and base resolution, the rows found so far
    (``specs``, in the order the benchmark shows them) and ``notes``; each ``add_*`` step appends one group of rows.
    The steps that may write files say so: ``export_onnx_spec`` / ``add_base_rows`` / ``add_detection_only`` export
    (cached), ``find_or_convert_tflite`` converts only when its caller's flag asks."""

    ckpt: Checkpoint
    out: Path
    rf: Any
    base: int
    sha: str
    log: Callable[[str], None]
    convert_variants: bool
    notes: dict[str, Any]
    specs: list[BackendSpec] = field(default_factory=list)

    def missing(self, line: str) -> None:
        self.notes["missing"].append(line)

    def find_or_convert_tflite(self, route: str, precision: str, resolution: int, *, convert: bool, message: str,
                               **opts: Any) -> Optional[Path]:
        """The cached .tflite (``converted_tflite``); when there is none and ``convert``, route B's file converted
        now by ``ensure_tflite`` (writes it under ``out``; ``message`` is logged first). None: not converted."""
        f = converted_tflite(self.out, self.sha, route, precision, resolution, **opts)
        if f is None and convert:
            self.log(message)
            f, _ = ensure_tflite(self.ckpt, self.out, route="litert", precision=precision, resolution=resolution,
                                 **opts)
        return f

    def export_onnx_spec(self, r: int, name: str) -> Optional[BackendSpec]:
        """ORT fp32 at ``r``: ``ensure_onnx`` exports the file unless cached; None (noted as missing) when it fails
        at a lower resolution."""
        self.log(f"ONNX at {r} (cached by notebook 03 when it exists) ...")
        try:
            # Lower resolutions: ensure_onnx's raw max-abs gate fails on a TopK near-tie of the random-weight demo
            # (at 336, 2 of 200 queries swap on one photo while all top-10 detections match), so those files are
            # judged by this benchmark's own detection-level drift instead (``drift`` in the result).
            path, meta = ensure_onnx(self.ckpt, self.out, resolution=r, rf=self.rf, verify=(r == self.base))
        except (RuntimeError, ValueError) as exc:  # e.g. its parity gate failed: report, keep benchmarking
            if r == self.base:
                raise
            self.missing(f"{name}: {str(exc).splitlines()[0][:300]}")
            return None
        return BackendSpec(name, "onnxruntime", str(path), r, meta={"route": "ort", "precision": "fp32"})

    def add_base_rows(self, torchscript: bool) -> None:
        """PyTorch eager and traced, the TorchScript ``.pt`` (exported by ``ensure_torchscript`` unless cached) and
        ORT fp32, at the base resolution."""
        ckpt, base = self.ckpt, self.base
        self.specs.append(BackendSpec("pytorch eager", "torch", str(ckpt), base, meta={"route": "torch"}))
        self.specs.append(BackendSpec("pytorch traced", "torch-traced", str(ckpt), base,
                                      meta={"route": "torch", "how": "rfdetr inference(compile=True)"}))
        if torchscript:
            pt, pt_meta = ensure_torchscript(self.rf, ckpt, self.out / "variants")
            self.specs.append(BackendSpec("torchscript .pt", "torchscript", str(pt), base,
                                          meta={"route": "torchscript", "workaround": pt_meta.get("workaround")}))
            self.notes["torchscript"] = pt_meta
        self.specs.append(self.export_onnx_spec(base, "onnxruntime fp32"))

    def add_tflite_grid(self, routes: Sequence[str], precisions: Sequence[str]) -> None:
        """Every TFLite route × precision at the base resolution; route B's static int8 converted when missing and
        ``convert_variants``."""
        for route in routes:
            for prec in precisions:
                if prec in STATIC_PRECISIONS and route != "litert":
                    continue  # static selective int8 is route B's (ai-edge-quantizer on the litert file)
                f = self.find_or_convert_tflite(
                    route, prec, self.base, convert=prec in STATIC_PRECISIONS and self.convert_variants,
                    message=f"quantising route B {prec} (static, calibrated on the train split) ...")
                if f is None:
                    self.missing(f"tflite {route} {prec} @{self.base}: not converted yet (notebook 04 / "
                                 f"`python -m nailkit convert`)")
                    continue
                self.specs.append(BackendSpec(f"tflite {route} {prec}", "tflite", str(f), self.base,
                                              meta={"route": route, "precision": prec}))

    def add_resolution_sweep(self, res_list: Sequence[int], sweep_kinds: Sequence[str],
                             convert_sweep_tflite: bool) -> None:
        """``sweep_kinds`` at each resolution other than the base one (route B fp32 converted when
        ``convert_sweep_tflite``)."""
        ckpt = self.ckpt
        for r in res_list:
            if r == self.base:
                continue
            for kind in sweep_kinds:
                if kind == "torch":
                    self.specs.append(BackendSpec(f"pytorch eager @{r}", "torch", str(ckpt), r,
                                                  meta={"route": "torch"}))
                elif kind == "onnxruntime":
                    spec = self.export_onnx_spec(r, f"onnxruntime fp32 @{r}")
                    if spec is not None:
                        self.specs.append(spec)
                elif kind.startswith("tflite-"):
                    route = kind.split("-", 1)[1]
                    f = self.find_or_convert_tflite(route, "fp32", r,
                                                    convert=convert_sweep_tflite and route == "litert",
                                                    message=f"converting route B fp32 at {r} (litert-torch) ...")
                    if f is None:
                        self.missing(f"tflite {route} fp32 @{r}: not converted")
                        continue
                    self.specs.append(BackendSpec(f"tflite {route} fp32 @{r}", "tflite", str(f), r,
                                                  meta={"route": route, "precision": "fp32"}))
                else:
                    raise ValueError(f"unknown sweep kind {kind!r}; expected torch, onnxruntime, tflite-litert, "
                                     f"tflite-onnx2tf")

    def add_tflite_variant(self, route: str, name: str, **opts: Any) -> None:
        """The base-resolution fp32 TFLite of ``route`` with export ``opts`` (route B converted when
        ``convert_variants``), or a note saying how to convert it."""
        f = self.find_or_convert_tflite(route, "fp32", self.base, convert=self.convert_variants and route == "litert",
                                        message=f"converting route B fp32 {opts} (litert-torch) ...", **opts)
        if f is None:
            self.missing(f"{name}: not converted (`python -m nailkit convert --route {route} --precision "
                         f"fp32" + "".join(f" --{k.replace('_', '-')} {v}" for k, v in opts.items()) + "`)")
            return
        self.specs.append(BackendSpec(name, "tflite", str(f), self.base,
                                      meta={"route": route, "precision": "fp32", **opts}))

    def add_sampler_variants(self, tent_routes: Sequence[str], xnn_routes: Sequence[str],
                             xnn_precisions: Sequence[str]) -> None:
        """The tent-sampler and XNNPACK-friendly (``xnn``) files, with the xnn graph's static int8 files."""
        for route in tent_routes:
            self.add_tflite_variant(route, f"tflite {route} fp32 tent", sampling="tent")
        for route in xnn_routes:
            self.add_tflite_variant(route, f"tflite {route} fp32 xnn", sampling="xnn")
            for prec in [p for p in xnn_precisions if p in STATIC_PRECISIONS and route == "litert"]:
                # static int8 of the xnn graph: the int8 backbone and a decoder that stays on XNNPACK
                f = self.find_or_convert_tflite(route, prec, self.base, convert=self.convert_variants,
                                                message=f"quantising route B {prec} of the xnn graph ...",
                                                sampling="xnn")
                if f is None:
                    self.missing(f"tflite {route} {prec} xnn: not converted")
                    continue
                self.specs.append(BackendSpec(f"tflite {route} {prec} xnn", "tflite", str(f), self.base,
                                              meta={"route": route, "precision": prec, "sampling": "xnn"}))

    def add_mask_query_rows(self, n: int, kinds: Sequence[str]) -> None:
        """Masks for the ``n`` best queries only, one row per kind (the ONNX file exported by ``ensure_onnx``)."""
        ckpt, base = self.ckpt, self.base
        for kind in kinds:
            if kind == "torch":
                self.specs.append(BackendSpec(f"pytorch eager mq{n}", "torch", str(ckpt), base,
                                              meta={"route": "torch", "mask_queries": n}))
            elif kind == "onnxruntime":
                self.log(f"ONNX with masks for the top {n} queries (ensure_onnx, verified) ...")
                path, _ = ensure_onnx(ckpt, self.out, resolution=base, rf=self.rf, mask_queries=n)
                self.specs.append(BackendSpec(f"onnxruntime fp32 mq{n}", "onnxruntime", str(path), base,
                                              meta={"route": "ort", "precision": "fp32", "mask_queries": n}))
            elif kind.startswith("tflite-"):
                route = kind.split("-", 1)[1]
                self.add_tflite_variant(route, f"tflite {route} fp32 mq{n}", mask_queries=n)
            else:
                raise ValueError(f"unknown mask-query kind {kind!r}; expected torch, onnxruntime, tflite-litert, "
                                 f"tflite-onnx2tf")

    def add_detection_only(self) -> None:
        """PyTorch and ORT without the segmentation head (the ONNX file exported by
        ``export_detection_only_onnx``)."""
        self.specs.append(BackendSpec("pytorch eager det-only", "torch", str(self.ckpt), self.base, segmentation=False,
                                      meta={"route": "torch"}))
        self.log("detection-only ONNX ...")
        det = export_detection_only_onnx(self.rf, self.ckpt, self.out / "variants", self.base)
        self.specs.append(BackendSpec("onnxruntime fp32 det-only", "onnxruntime", str(det), self.base,
                                      segmentation=False, meta={"route": "ort", "precision": "fp32"}))
