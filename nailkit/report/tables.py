"""Tables and plots for the notebooks and the CLI. Compute modules return numbers; this module shows them.

* ``table(rows, columns=None, fmt="pipe")`` (markdown): the one table formatter (tabulate). ``columns``: keys, or
  ``(key, header, format spec)`` triples; missing / non-finite values print as "–". ``fmt="simple"`` gives a
  plain-text table (``format_rows``).
* notebook 03: ``onnx_parity_table(report)``, ``plot_per_query(ax, report, image_index)``, ``format_onnx_parity``.
* notebook 04: ``tflite_parity_rows(results)``, ``plot_error_vs_control(ax, results, metric)``,
  ``plot_delegation(ax, results)``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

Column = str | tuple[str, str, str]


def _cell(v: Any, spec: Optional[str]) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if spec:
        return format(v, spec)
    if isinstance(v, float):
        return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.4g}"
    if isinstance(v, bool):
        return "✓" if v else "✗"
    return str(v)


def table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[Column]] = None, fmt: str = "pipe") -> str:
    """``rows`` as a table (markdown by default). Every value is formatted here, so tabulate only lays out text."""
    from tabulate import tabulate

    if columns is None:
        columns = list(rows[0]) if rows else []
    if not columns:
        raise ValueError("table needs at least one column (or a non-empty row to take them from)")
    cols = [(c, c, None) if isinstance(c, str) else c for c in columns]
    body = [[_cell(r.get(k), None if spec in (None, "s") else spec) for k, _, spec in cols] for r in rows]
    align = ["left" if spec in (None, "s") else "right" for _, _, spec in cols]
    return tabulate(body, headers=[h for _, h, _ in cols], tablefmt=fmt, disable_numparse=True, colalign=align)


def format_rows(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    """A plain-text table (``table(..., fmt="simple")``); "(no rows)" when empty."""
    return table(rows, columns, fmt="simple") if rows else "(no rows)"


# ----------------------------------------------------------------------------------------------------------------
# notebook 03: ONNX vs PyTorch
# ----------------------------------------------------------------------------------------------------------------

def onnx_parity_table(report: Any) -> str:
    """One row per (image, output) of an ``onnx_export.OnnxParityReport``."""
    return table(report.table(), [("image", "image", "s"), ("output", "output", "s"), ("max_abs", "max abs", ".2e"),
                                  ("mean_abs", "mean abs", ".2e"),
                                  ("query_matched_max_abs", "query-matched max abs", ".2e"), ("ok", "ok", "s")])


def format_onnx_parity(summary: Mapping[str, Any]) -> str:
    """Plain-text summary of ``OnnxParityReport.summary()`` (also what ``export-onnx`` prints)."""
    lines = [f"parity vs PyTorch on {summary['num_images']} image(s): {'PASS' if summary['passed'] else 'FAIL'}"]
    for k, v in summary["max_abs"].items():
        lines.append(f"  {k:12s} max-abs {v:.2e}  mean-abs {summary['mean_abs'][k]:.2e}  "
                     f"shape {summary['output_shapes'].get(k)}")
    lines.append(f"  top-{summary['top_k']} detections matched {summary['detections_matched']}/"
                 f"{summary['detections_expected']}, min mask IoU {summary['min_mask_iou']}, "
                 f"max box diff {summary['max_box_l1_px']:.3g}px, max score diff {summary['max_score_diff']:.2e}")
    for f in summary.get("failures", []):
        lines.append(f"  FAILED: {f}")
    return "\n".join(lines)


def plot_per_query(ax, report: Any, image_index: int = 0):
    """Per-query max-abs error (after query matching) of logits, boxes and masks, log scale, with the gate line."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3))
    im = report.images[image_index]
    for name, vals in im.per_query.items():
        ax.semilogy(np.maximum(np.asarray(vals), 1e-12), ".", ms=3, label=name)
    ax.axhline(report.max_abs_tol, color="r", ls="--", lw=1, label=f"gate {report.max_abs_tol:g}")
    ax.set_xlabel("query (reference order)")
    ax.set_ylabel("max |ORT − PyTorch|\n(exact 0 drawn at 1e-12)", fontsize=8)
    ax.set_title(f"per-query error, {im.image}")
    ax.legend(fontsize=8, ncol=4)
    return ax


# ----------------------------------------------------------------------------------------------------------------
# notebook 04: TFLite artifacts
# ----------------------------------------------------------------------------------------------------------------

def tflite_parity_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per artifact from ``{label: {'precision', 'meta', 'parity', 'delegation'}}``."""
    rows = []
    for label, r in results.items():
        a = r["parity"]["aggregate"]
        rows.append({
            "artifact": label, "MB": r["meta"]["bytes"] / 1e6,
            "pre-TopK max-abs": a["pre_topk_max_abs"],
            "same selection": f"{a['selection_same']}/{a['images']}",
            "same order": f"{a['selection_order_same']}/{a['images']}",
            "forced max-abs": a["forced_max_abs"], "forced mask IoU": a["forced_min_mask_iou"],
            "unforced top-10 agree": f"{a['unforced_agree']}/{a['images']} ({a['ties']} tied)",
            "control ratio": a.get("control_ratio_max", float("nan")),
            "convert s": r["meta"]["conversion_wall_s"], "peak RSS MB": r["meta"]["conversion_peak_rss_mb"],
            "XNNPACK": (f"{r['delegation']['xnnpack_nodes']}/{r['delegation']['xnnpack_total']} in "
                        f"{r['delegation']['xnnpack_partitions']}") if r.get("delegation") else "",
        })
    return rows


def plot_error_vs_control(ax, results: Mapping[str, Mapping[str, Any]], metric: str = "pre_topk_max_abs") -> None:
    """Bar per artifact: its error vs PyTorch fp32, next to its rounding control's (log scale)."""
    labels = list(results)
    err = [results[k]["parity"]["aggregate"]["error"][metric] for k in labels]
    ctl = [results[k]["parity"]["aggregate"].get("control_error", {}).get(metric, np.nan) for k in labels]
    x = np.arange(len(labels))
    ax.bar(x - 0.2, err, 0.4, label="artifact vs PyTorch fp32")
    ax.bar(x + 0.2, ctl, 0.4, label="PyTorch rounding control vs fp32")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)


def plot_delegation(ax, results: Mapping[str, Mapping[str, Any]]) -> None:
    """Delegated fraction per artifact, annotated with the partition count."""
    labels = [k for k in results if results[k].get("delegation")]
    frac = [results[k]["delegation"]["xnnpack_fraction"] * 100 for k in labels]
    parts = [results[k]["delegation"]["xnnpack_partitions"] for k in labels]
    bars = ax.bar(labels, frac, color="tab:green")
    for b, p in zip(bars, parts):
        ax.annotate(f"{p} part.", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.axhline(99, ls="--", color="gray", lw=1)
    ax.set_ylim(0, 105)
    ax.set_ylabel("% of ops on XNNPACK")
    ax.tick_params(axis="x", rotation=30)


# ----------------------------------------------------------------------------------------------------------------
# notebook 07: accuracy per backend × precision × resolution
# ----------------------------------------------------------------------------------------------------------------

ACCURACY_COLUMNS: list[Column] = [
    ("backend", "backend", "s"), ("precision", "precision", "s"), ("resolution", "input", "d"),
    ("mask_map50_95", "mask mAP50-95", ".3f"), ("mask_map50", "mask mAP50", ".3f"),
    ("box_map50_95", "box mAP50-95", ".3f"), ("d_mask_map50_95_pt", "Δ mask mAP50-95 (pt) vs PyTorch@432", "+.2f"),
    ("d_same_res_pt", "Δ vs PyTorch same input (pt)", "+.2f"), ("recall", "recall@thr", ".3f"),
    ("fp_per_image", "FP/img@thr", ".2f"), ("latency_ratio", "latency × ORT fp32 (nb 06)", ".2f"),
    ("size_mb", "size MB", ".1f")]


def accuracy_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The accuracy table of ``nailkit.accuracy.evaluate.accuracy_table`` as markdown."""
    return table(rows, ACCURACY_COLUMNS)


def plot_accuracy_vs_latency(ax, rows: Sequence[Mapping[str, Any]]) -> None:
    """Mask mAP50-95 against latency (ratio to ORT fp32 from notebook 06; measured forward ms when absent)."""
    have_ratio = any(r.get("latency_ratio") is not None for r in rows)
    for r in rows:
        x = r.get("latency_ratio") if have_ratio else r.get("mean_forward_ms")
        if x is None:
            continue
        marker = {"fp32": "o", "fp16": "s", "int8": "^"}.get(str(r["precision"]), "D")
        ax.scatter(x, r["mask_map50_95"], marker=marker, s=30 + r["resolution"] / 8)
        ax.annotate(f"{r['backend']} {r['precision']} @{r['resolution']}", (x, r["mask_map50_95"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("latency × ONNX Runtime fp32 (notebook 06)" if have_ratio else "forward ms (this run)")
    ax.set_ylabel("mask mAP50-95")
    ax.set_title("speed vs accuracy (marker: o fp32, s fp16, ^ int8; size: input resolution)")
    ax.grid(alpha=0.3)


# ----------------------------------------------------------------------------------------------------------------
# the GPU target (nailkit.gpu.verify.verify_gpu_graphs / fp16_safety), notebook 04
# ----------------------------------------------------------------------------------------------------------------

def gpu_graph_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per graph: ops, op check, and the GPU delegate's verdict / run time per mode."""
    rows = []
    for g, oc in result["op_check"].items():
        row: dict[str, Any] = {"graph": g, "ops": oc["n_ops"], "op check": "clean" if oc["ok"] else "BLOCKERS",
                               "banned": ", ".join(f"{k}×{v}" for k, v in oc["banned"].items()) or "none",
                               ">4-D tensors": oc["over_4d_count"]}
        for mode, label in (("gpu", "default"), ("gpu_f32", "enforce_f32")):
            m = result.get(mode)
            if not m:
                continue
            fa = (m.get("fully_accelerated") or {}).get(g)
            row[f"GPU ops ({label})"] = (m.get("ops_on_gpu") or {}).get(g)
            row[f"fully accelerated ({label})"] = fa
            ms = (m.get("run_ms") or {}).get(g)
            row[f"SwiftShader ms ({label})"] = None if ms is None else round(ms)
        rows.append(row)
    return rows


def gpu_parity_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chain vs the one-graph PyTorch model: CPU interpreter, GPU default precision, GPU enforce_f32."""
    rows = []
    for mode, label in (("cpu", "CPU interpreter (XNNPACK)"), ("gpu", "GPU delegate, default precision"),
                        ("gpu_f32", "GPU delegate, enforce_f32")):
        p = (result.get(mode) or {}).get("parity")
        if p:
            rows.append({"run": label, "images": p["images"], "top-10 matched": p["matched_top10"],
                         "min mask IoU": round(p["min_mask_iou"], 4), "mean min mask IoU":
                         round(p["mean_min_mask_iou"], 4), "max score diff": float(f"{p['max_score_diff']:.2g}"),
                         "max box diff (px)": round(p["max_box_l1_px"], 3)})
    return rows


def fp16_rows(safety: Mapping[str, Any]) -> list[dict[str, Any]]:
    """fp16 safety: the largest activations feeding LayerNorm / softmax, before and after SafeLayerNorm."""
    rows = []
    for label in ("before", "after"):
        for g, d in safety[label].items():
            rows.append({"LayerNorm": "rfdetr's" if label == "before" else "SafeLayerNorm", "graph": g,
                         "LayerNorm sites": int(d.get("layer_norm_sites", 0)),
                         "max abs(x) into LayerNorm": round(d["layer_norm_max_abs_in"], 1),
                         "max abs(x) where it reduces": round(d["layer_norm_max_abs_reduced"], 2),
                         "max Σ(x−μ)² per row": float(f"{d['layer_norm_max_sumsq']:.3g}"),
                         # attention through SDPA (DINOv2) has no separate softmax to record: "–"
                         "max abs(x) into softmax": round(d["softmax_max_abs_in"], 1) if d.get("softmax_sites")
                         else None,
                         "fp16 overflow sites": len(d["fp16_overflow_sites"])})
    return rows
