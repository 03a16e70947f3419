"""The speed targets (operators on XNNPACK, int8 and fp32 TFLite against ORT fp32, the int8 ceiling, top-N masks),
each stated with this run's number and the measurement that decides it (``speed_targets``), and the route-B static
int8 files against their fp32 file and the int8 ceiling (``static_int8_rows``). Both read a finished
``BenchResult``; their columns are ``nailkit.report.bench_report.TARGET_COLUMNS`` / ``STATIC_INT8_COLUMNS``."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from nailkit.bench.benchmark import BenchResult
from nailkit.bench.flops import flop_key
from nailkit.core.artifacts import read_sidecar
from nailkit.tflite.options import STATIC_PRECISIONS

#: route B's static selective int8 precisions (``nailkit.tflite.options.STATIC_PRECISIONS``: w8a8, w8a16)
STATIC_INT8 = tuple(STATIC_PRECISIONS)


def speed_targets(res: BenchResult, coverage: Mapping[str, Mapping[str, Any]], *, threads: int = 1,
                  cpu: Optional[Mapping[str, Any]] = None) -> list[dict[str, Any]]:
    """The speed targets, one row each: ``target``, ``measured`` (text), ``met`` (bool, or None when no row of this
    run can decide it) and ``why`` — the measurement that explains a miss (what stays off XNNPACK, the ceiling ratio,
    the share of FLOPs a change can remove). Numbers come from this run only (``res`` at ``threads``, ``coverage``:
    ``tflite.delegation_report`` per backend name)."""
    rows = res.rows(threads)
    by = {r["backend"]: r for r in rows}
    ceil = res.ceilings.get(threads, {})
    return (_delegation_targets(coverage, by) + _int8_targets(res, rows, ceil, cpu) + _fp32_target(res, rows, by)
            + _mask_query_targets(res, rows, by))


def _delegation_targets(coverage: Mapping[str, Mapping[str, Any]], by: Mapping[str, dict[str, Any]]
                        ) -> list[dict[str, Any]]:
    """Target 1: XNNPACK delegation, one row per fp32 file of this run."""
    out = []
    for name, rep in coverage.items():
        r = by.get(name)
        if r is None or r["precision"] != "fp32" or r.get("mask_queries"):
            continue
        frac, parts = rep.get("xnnpack_fraction", 0.0), rep.get("xnnpack_partitions")
        left = ", ".join(f"{k}×{v['count']}" for k, v in list(rep.get("undelegated", {}).items())[:8])
        out.append({"target": f"≥ 99% of ops on XNNPACK in ≤ 3 partitions ({name})",
                    "measured": f"{rep.get('xnnpack_nodes')}/{rep.get('xnnpack_total')} = {frac:.1%} in {parts} "
                                f"partitions",
                    "met": bool(frac >= 0.99 and parts is not None and parts <= 3),
                    "why": f"off XNNPACK: {left}" if left else ""})
    return out


def _int8_targets(res: BenchResult, rows: list[dict[str, Any]], ceil: Mapping[str, float],
                  cpu: Optional[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Targets 2 and 3: the best int8 TFLite against ORT fp32 and against this CPU's int8 GEMM ceiling."""
    int8 = [r for r in rows if r["kind"] == "tflite" and r["ceiling"] in ("dynamic_int8", "int8")
            and r.get("x_ort_fp32") is not None and r["resolution"] == res.specs[res.reference_ort].resolution]
    best = min(int8, key=lambda r: r["x_ort_fp32"]) if int8 else None
    dot = list((cpu or {}).get("int8_dot") or [])
    gain = (ceil.get("dynamic_int8", 0) / ceil["fp32"]) if ceil.get("fp32") else None
    if best is None:
        return [{"target": "best int8 TFLite ≤ 0.45× ORT fp32 (int8-dot CPU), mask mAP within 1 pt",
                 "measured": "no int8 file in this run", "met": None, "why": ""}]
    cf = best.get("ceiling_fraction")
    return [{"target": "best int8 TFLite ≤ 0.45× ORT fp32 (int8-dot CPU), mask mAP within 1 pt (07)",
             "measured": f"{best['backend']}: {best['x_ort_fp32']:.2f}× ORT fp32; CPU int8 dot: "
                         f"{'+'.join(dot) or 'none'}",
             "met": bool(best["x_ort_fp32"] <= 0.45) if dot else None,
             "why": (f"the dynamic-int8 GEMM ceiling is {gain:.2f}× the fp32 one on this CPU; only the "
                     f"linears/convs (GEMM) get it, the rest of the graph stays fp32" if gain else "")},
            {"target": "best int8 file ≥ 70% of this CPU's int8 GEMM ceiling",
             "measured": (f"{best['backend']}: {cf:.0%} of the {best['ceiling']} ceiling "
                          f"({ceil.get(best['ceiling'], float('nan')):.0f} GFLOP/s)") if cf else "no ceiling",
             "met": bool(cf >= 0.70) if cf else None,
             "why": ("static selective int8 runs only the backbone's linears/convs on int8 kernels; the "
                     "decoder, heads, attention matmuls, layer norms, softmax, GELU and mask upsampling stay "
                     "fp32, with QUANTIZE/DEQUANTIZE at every boundary"
                     if best["precision"] in STATIC_INT8 else
                     "dynamic-range int8 quantises activations at run time per op and runs every non-GEMM op "
                     "(softmax, layer norm, GELU, sampling, mask upsampling) in fp32")}]


def _fp32_target(res: BenchResult, rows: list[dict[str, Any]], by: Mapping[str, dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """Target 4: the best fp32 TFLite against ORT fp32 (no row when this run has no fp32 TFLite)."""
    fp32 = [r for r in rows if r["kind"] == "tflite" and r["precision"] == "fp32" and not r.get("mask_queries")
            and r.get("x_ort_fp32") is not None and r["resolution"] == res.specs[res.reference_ort].resolution]
    if not fp32:
        return []
    b = min(fp32, key=lambda r: r["x_ort_fp32"])
    ort = by.get(res.reference_ort, {})
    return [{"target": "fp32 TFLite ≤ 0.95× ORT fp32 (fp32 gates unchanged)",
             "measured": f"{b['backend']}: {b['x_ort_fp32']:.2f}× ORT fp32 "
                         f"({b['ceiling_fraction']:.0%} of the fp32 ceiling)" if b.get("ceiling_fraction")
             else f"{b['backend']}: {b['x_ort_fp32']:.2f}×",
             "met": bool(b["x_ort_fp32"] <= 0.95),
             "why": (f"ORT fp32 already runs at {ort['ceiling_fraction']:.0%} of the fp32 GEMM ceiling: "
                     f"at most {1 / ort['ceiling_fraction']:.2f}× is left for any fp32 backend"
                     if ort.get("ceiling_fraction") else "")}]


def _full_model_row_name(res: BenchResult, rows: list[dict[str, Any]], r: Mapping[str, Any]) -> Optional[str]:
    """The backend that runs ``r``'s model with every query's mask: the reference torch / ORT row, or the fp32
    TFLite of the same route, sampling and resolution."""
    full_name = {"torch": res.reference_torch, "onnxruntime": res.reference_ort}.get(r["kind"])
    if r["kind"] == "tflite":
        full_name = next((x["backend"] for x in rows if x["kind"] == "tflite" and x["route"] == r["route"]
                          and x["precision"] == "fp32" and not x.get("mask_queries")
                          and x.get("sampling", "grid") == r.get("sampling", "grid")
                          and x["resolution"] == r["resolution"]), None)
    return full_name


def _mask_query_targets(res: BenchResult, rows: list[dict[str, Any]], by: Mapping[str, dict[str, Any]]
                        ) -> list[dict[str, Any]]:
    """Target 5: each ``--mask-queries N`` row against the same backend with every query's mask."""
    out = []
    for r in rows:
        n = r.get("mask_queries")
        if not n:
            continue
        full_name = _full_model_row_name(res, rows, r)
        full = by.get(full_name)
        if full is None:
            continue
        fl_full, fl_n = full.get("gflops"), r.get("gflops")
        det = res.flops.get(flop_key(r["resolution"], False), {}).get("gflops")
        ratio = r["median_ms"] / full["median_ms"]
        why = ""
        if fl_full and fl_n:
            why = f"FLOPs {fl_n:.1f} / {fl_full:.1f} GFLOP = {fl_n / fl_full:.3f}"
            if det:
                why += (f"; the whole mask head is {(fl_full - det) / fl_full:.1%} of the full model's FLOPs, "
                        f"{(fl_n - det) / fl_full:.1%} left at {n} queries")
        out.append({"target": f"--mask-queries {n} forward ≤ 0.92× the full model ({r['backend']})",
                    "measured": f"{ratio:.3f}× {full_name} ({r['median_ms']:.0f} vs {full['median_ms']:.0f} ms)",
                    "met": bool(ratio <= 0.92), "why": why})
    return out


def static_int8_rows(res: BenchResult, coverage: Mapping[str, Mapping[str, Any]], *, threads: int = 1
                     ) -> list[dict[str, Any]]:
    """One row per route-B static int8 file of this run (``STATIC_INT8``): latency against ORT fp32 and against the
    fp32 file of its route, the fraction of the int8 GEMM ceiling, size, calibration images, how many linears/convs
    it quantised, the parity run's ratio to the dynamic-int8 rounding control (reported, not gated) and its XNNPACK
    coverage (``coverage``: ``tflite.delegation_report`` per backend name)."""
    rows = res.rows(threads)
    out = []
    for r in rows:
        if r["kind"] != "tflite" or r["precision"] not in STATIC_INT8:
            continue
        meta = read_sidecar(res.specs[r["backend"]].path) or {}
        fp32 = next((x for x in rows if x["kind"] == "tflite" and x["route"] == r["route"]
                     and x["precision"] == "fp32" and x["sampling"] == r["sampling"] and not x.get("mask_queries")
                     and x["resolution"] == r["resolution"]), None)
        q = ((meta.get("recipe") or {}).get("quantized_ops") or {})
        cov = coverage.get(r["backend"], {})
        out.append({"backend": r["backend"], "precision": r["precision"], "median_ms": r["median_ms"],
                    "x_ort_fp32": r["x_ort_fp32"],
                    "x_tflite_fp32": r["median_ms"] / fp32["median_ms"] if fp32 else None,
                    "ceiling_fraction": r["ceiling_fraction"], "size_mb": r["size_mb"],
                    "calibration_images": (meta.get("calibration") or {}).get("n"),
                    "quantized_linears": sum(v for k, v in q.items() if k in ("FULLY_CONNECTED", "CONV_2D",
                                                                              "DEPTHWISE_CONV_2D")),
                    "control_ratio_max": (meta.get("parity") or {}).get("control_ratio_max"),
                    "xnnpack_fraction": cov.get("xnnpack_fraction"),
                    "xnnpack_partitions": cov.get("xnnpack_partitions")})
    return out
