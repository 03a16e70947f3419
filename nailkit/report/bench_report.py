"""The benchmark's tables and plots (notebook 06, ``python -m nailkit bench``): ``nailkit.bench`` measures, this
module shows. Results are read duck-typed — a ``BenchResult``'s ``machine``, ``specs`` (``name``, ``kind``,
``resolution``, ``segmentation``, ``file_size_mb``, ``meta``), ``latency``, ``flops``, ``drift``, ``ceilings``,
``rows(threads)`` and ``sweep_rows(threads)`` — so nothing here imports the benchmark.

* ``markdown_report(res)``: the headline table per thread count, the resolution sweep and the FLOP counts;
* the column tables ``HEADLINE_COLUMNS``, ``SWEEP_COLUMNS``, ``TARGET_COLUMNS``, ``STATIC_INT8_COLUMNS`` (for
  ``nailkit.report.tables.table``);
* plots on a matplotlib axis (nothing returned): ``plot_latency_vs_resolution``, ``plot_size_vs_drift``,
  ``plot_delegation_latency``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from nailkit.report.tables import table

HEADLINE_COLUMNS = (
    ("backend", "backend", "s"), ("resolution", "R", "d"), ("x_ort_fp32", "× ORT fp32", ".2f"),
    ("x_pytorch_eager", "× PyTorch eager", ".2f"), ("median_ms", "median ms", ".1f"), ("p90_ms", "p90 ms", ".1f"),
    ("size_mb", "size MB", ".1f"), ("load_s", "load s", ".2f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
    ("gflops", "GFLOP", ".1f"), ("ceiling", "ceiling", "s"), ("ceiling_fraction", "of its ceiling", ".0%"),
    ("matched_top10", "top-10 matched", "s"), ("min_mask_iou", "min mask IoU", ".3f"),
    ("max_logit_abs", "max |Δlogit|", ".1e"))

SWEEP_COLUMNS = (("backend", "backend", "s"), ("resolution", "R", "d"), ("speedup", "speed-up vs same @base", ".2f"),
                 ("median_ms", "median ms", ".1f"), ("gflops", "GFLOP", ".1f"),
                 ("matched_top10", "top-10 matched vs PyTorch@base", "s"),
                 ("mean_min_mask_iou", "mean min mask IoU", ".3f"), ("max_box_l1_px", "max box Δ px", ".1f"),
                 ("max_score_diff", "max score Δ", ".2g"))

TARGET_COLUMNS = (("target", "target", "s"), ("measured", "measured (this run)", "s"), ("met", "met", "s"),
                  ("why", "the measurement that says why", "s"))

STATIC_INT8_COLUMNS = (("backend", "backend", "s"), ("median_ms", "median ms", ".0f"),
                       ("x_ort_fp32", "× ORT fp32", ".2f"), ("x_tflite_fp32", "× its TFLite fp32", ".2f"),
                       ("ceiling_fraction", "of the int8 ceiling", ".0%"), ("size_mb", "MB", ".1f"),
                       ("calibration_images", "calibration images", "d"),
                       ("quantized_linears", "int8 linears/convs", "d"),
                       ("control_ratio_max", "error ÷ dynamic-int8 control (reported)", ".2f"),
                       ("xnnpack_fraction", "on XNNPACK", ".1%"), ("xnnpack_partitions", "partitions", "d"))


def family(spec: Any) -> str:
    """Backend family (the resolution sweep, the latency-vs-resolution plot): the name without its '@R' suffix."""
    return spec.name.split(" @")[0]


def markdown_report(res: Any) -> str:
    """The benchmark as markdown: per thread count the headline table (ratios, ms, size, memory, FLOPs, the
    fraction of its XNNPACK ceiling, drift), then the resolution sweep and the FLOP counts."""
    m = res.machine
    lines = [f"# nailkit benchmark — {m.get('cpu')} ({m.get('cpu_count')} cores)", "",
             "Latency ratios are median latency ÷ the reference's median latency at the same thread count "
             "(< 1 = faster). Batch 1, preprocessed input; pre/post-processing not timed. Backends interleaved "
             "round by round in one process.", ""]
    if m.get("note"):
        lines += [f"Note: {m['note']}", ""]
    for t in sorted(res.latency):
        ceil = ", ".join(f"{k} {v:.1f}" for k, v in res.ceilings.get(t, {}).items())
        over = ", oversubscribed: more threads than cores" if t > (m.get("cpu_count") or t) else ""
        lines += [f"## {t} thread{'s' if t != 1 else ''} (XNNPACK GEMM ceilings: {ceil or 'not measured'} GFLOP/s"
                  f"{over})", "", table(res.rows(t), HEADLINE_COLUMNS), ""]
    sweep = res.sweep_rows()
    if sweep:
        lines += ["## Resolution sweep (drift vs PyTorch fp32 at the base resolution, detections on the original "
                  "image)", "", table(sweep, SWEEP_COLUMNS), ""]
    if res.flops:
        lines += ["## FLOPs (counted: matmul/conv/attention; other ops listed as uncounted)", ""]

        def _order(kv):
            k = str(kv[0])
            return (k.startswith("-"), k)

        for k, v in sorted(res.flops.items(), key=_order):
            ks = str(k)
            label = ks.lstrip("-").replace("_", " ") + (" detection-only" if ks.startswith("-") else "")
            unc = ", ".join(list(v.get("uncounted_ops", {}))[:8])
            lines.append(f"- {label}: {v['gflops']:.1f} GFLOP ({v['gmacs']:.1f} GMAC); not counted: {unc}")
        lines.append("")
    return "\n".join(lines)


def plot_latency_vs_resolution(ax, res: Any, threads: Optional[int] = None) -> None:
    t = threads or min(res.latency)
    lat = res.latency[t]
    fams: dict[str, list[tuple[int, float]]] = {}
    for name, spec in res.specs.items():
        if spec.segmentation and name in lat:
            fams.setdefault(family(spec), []).append((spec.resolution, lat[name]["median_ms"]))
    for fam, pts in sorted(fams.items()):
        if len(pts) < 2:
            continue
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=fam)
    ax.set_xlabel("input resolution (px)")
    ax.set_ylabel(f"median latency, ms ({t} thread{'s' if t > 1 else ''})")
    ax.set_title("latency vs resolution")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_size_vs_drift(ax, res: Any) -> None:
    for name, spec in res.specs.items():
        d = res.drift.get(name, {})
        size = spec.file_size_mb
        if size is None or d.get("of") in (None, 0):
            continue
        miss = 1.0 - d["matched"] / d["of"]
        mi = d.get("mean_min_mask_iou")
        y = miss if mi is None else max(miss, 1.0 - mi)
        ax.scatter(size, max(y, 1e-6), s=30)
        ax.annotate(name, (size, max(y, 1e-6)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("drift vs PyTorch fp32: max(1 − matched top-10, 1 − mean min mask IoU)")
    ax.set_title("size vs accuracy drift (floor 1e-6 = identical)")
    ax.grid(alpha=0.3)


def plot_delegation_latency(ax, res: Any, coverage: Mapping[str, Mapping[str, Any]],
                            threads: Optional[int] = None) -> None:
    """Per TFLite backend: XNNPACK-delegated fraction of ops (bars, left axis) next to median latency (right)."""
    t = threads or min(res.latency)
    names = [n for n in res.specs if n in coverage and n in res.latency[t]]
    x = np.arange(len(names))
    frac = [100 * float(coverage[n].get("xnnpack_fraction", 0.0)) for n in names]
    ax.bar(x - 0.2, frac, width=0.4, color="tab:green", label="ops delegated to XNNPACK (%)")
    for i, n in enumerate(names):
        ax.annotate(f"{coverage[n].get('xnnpack_partitions', '?')} part.", (x[i] - 0.2, frac[i]), fontsize=7,
                    ha="center", va="bottom")
    ax.set_ylim(0, 110)
    ax.set_ylabel("delegated ops, %")
    ax2 = ax.twinx()
    ax2.bar(x + 0.2, [res.latency[t][n]["median_ms"] for n in names], width=0.4, color="tab:blue",
            label=f"median ms ({t} thr.)")
    ax2.set_ylabel("median latency, ms")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_title("XNNPACK coverage next to latency")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
