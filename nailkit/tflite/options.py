"""What a TFLite conversion can be asked for: routes, precisions, the defaults, the converter settings and package
versions that enter a file's cache key, and what the checkpoint itself records (resolution, class names).

Shared by the parent's conversion code (``nailkit.tflite.convert`` and the route, static-int8 and gate modules) and the
child processes (``nailkit.tflite.workers``), so that neither imports the other.
"""

from __future__ import annotations

from typing import Any

from nailkit.core.hardware import cpu_info
from nailkit.export import onnx_passes
from nailkit.model.build import OUTPUT_NAMES
from nailkit.model.checkpoint import Checkpoint
from nailkit.model.checkpoint_report import class_labels

ROUTES = ("onnx2tf", "litert")
PRECISIONS = ("fp32", "fp16", "int8")

#: The default path of ``convert`` and ``bundle``: the fastest file measured that passes its gate (2026-12-02, trained
#: demo, 1 thread, notebook 06): route B (litert-torch) with the XNNPACK-friendly graph — 1598/1600 ops on XNNPACK
#: in 2 partitions, 0.84× ORT fp32 on an AVX2 EPYC, same fp32 gate — where route A's onnx2tf + grid file put 96% of
#: ops on XNNPACK in 9 partitions at 1.13× and took 24 minutes to convert. Route A and grid stay one flag away.
DEFAULT_ROUTE = "litert"
DEFAULT_SAMPLING = {"litert": "xnn", "onnx2tf": "grid"}
DEFAULT_PATH_WHY = ("litert-torch + xnn sampling: the fastest measured file that passes its gate (99.9% of ops on "
                    "XNNPACK in 2 partitions, 0.84x ORT fp32 on AVX2, 0.92-0.96x on AVX-512; route A onnx2tf + grid: "
                    "96% in 9 partitions, 1.13x, and ~20 minutes to convert)")


def default_path(route: str | None = None, sampling: str | None = None) -> tuple[str, str]:
    """(route, sampling) with the defaults filled in: litert + xnn, or route A with grid sampling."""
    route = route or DEFAULT_ROUTE
    return route, sampling or DEFAULT_SAMPLING.get(route, "grid")


def default_precisions(cpu: Any = None) -> list[str]:
    """fp32, plus dynamic int8 where the CPU has int8 dot-product instructions (VNNI, AMX, dotprod): there int8 runs
    at ~0.6x fp32 (notebook 06); without them it ran at 1.14x ORT fp32 (AVX2 EPYC), slower than fp32."""
    info = cpu if cpu is not None else cpu_info()
    return ["fp32", "int8"] if info.int8_dot else ["fp32"]


EXTRA_PRECISIONS = ("full_int8",)  # route A only, slow, not in CI
#: route B only: static selective int8 (precision -> ``nailkit.tflite.quantize`` recipe). Reported against the dynamic-int8
#: rounding control, not gated by it (that control rounds activations per run, not to calibrated static ranges);
#: judged by notebook 07's accuracy gate instead.
STATIC_PRECISIONS = {"w8a8": "backbone_w8a8", "w8a16": "backbone_w8a16"}
#: train-split images a static precision is calibrated on by default (8: ~1 min and ~9 GB RSS for the 432 model)
DEFAULT_CALIBRATION = 8
#: precisions whose parity is reported (aggregate + ratio to the dynamic-int8 control) but not gated
REPORTED_NOT_GATED = ("full_int8", *STATIC_PRECISIONS)
ALL_OUTPUT_NAMES = tuple(OUTPUT_NAMES) + ("enc_scores", "topk_indices")
#: ONNX passes route A applies (only those shown to be needed), then the selection outputs are exposed.
ROUTE_A_PASSES = onnx_passes.DEFAULT_PASSES


def route_precisions(route: str) -> tuple[str, ...]:
    """The precisions ``route`` can make: ``PRECISIONS``, plus full_int8 on onnx2tf or the static ones on litert."""
    return PRECISIONS + (EXTRA_PRECISIONS if route == "onnx2tf" else tuple(STATIC_PRECISIONS))


#: ``disable_strict_mode``: onnx2tf's strict mode runs the TF graph built so far on dummy data inside the conversion of
#: every Reshape/MatMul/Concat/LayerNorm/… (50 op converters call ``dummy_tf_inference``), which grows with the square
#: of the graph: most of route A's time on this model (py-spy, 2026-12-02). nailkit gates every file against PyTorch
#: anyway (selection-aware fp32 parity), so a transposition error strict mode would have corrected fails the gate.
ONNX2TF_KWARGS = {"output_signaturedefs": True, "replace_to_pseudo_operators": ["Erf"],
                  "tflite_backend": "tf_converter", "disable_strict_mode": True}
#: Without strict mode, MatMul/Conv/… still run the TF graph built so far on onnxruntime's per-op reference values
#: (``acquisition_of_validation_data``) — again quadratic in the graph. onnx2tf skips that whole step when its ONNX
#: dummy inference fails; ``nailkit.tflite.workers._per_op_validation`` makes it skip it on purpose. The model's shapes
#: are static, so nothing needs onnx2tf's shape estimation; the gate is the check. Part of the cache key.
ONNX2TF_PER_OP_VALIDATION = False

#: the schema of the metadata embedded in every converted file (``nailkit.tflite.gate.embed_file_metadata``); part of
#: the cache key
EMBEDDED_METADATA = 1

#: versions that enter each stage's cache key
ONNX_PACKAGES = ("torch", "onnx", "rfdetr")
ROUTE_PACKAGES = {"onnx2tf": ONNX_PACKAGES + ("onnx2tf", "onnxsim", "tensorflow", "ai-edge-litert"),
                  "litert": ("torch", "rfdetr", "litert-torch", "ai-edge-quantizer", "ai-edge-litert")}


def checkpoint_info(ckpt: Checkpoint) -> dict[str, Any]:
    """Resolution, class names and num_select recorded in the checkpoint (no model is built; read once)."""
    rep = ckpt.report
    names, source = class_labels(rep)
    return {"resolution": int(rep.resolution or 432), "class_names": names, "class_names_source": source,
            "num_classes": rep.num_classes, "num_select": int(ckpt.args.get("num_select") or 200)}


def resolution_of(ckpt: Checkpoint, resolution: int | None) -> int:
    return int(resolution) if resolution else checkpoint_info(ckpt)["resolution"]
