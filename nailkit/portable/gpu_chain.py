"""The GPU target's runtime: three ``.tflite`` graphs and the host steps between them. numpy + ai-edge-litert only
(ships in the ``--target gpu`` bundle next to postprocess.py, which holds the host steps).

    image ─▶ graph_a ─▶ enc_logits, enc_boxes, memory
                         │ host: select_proposals (top-Q tokens by max class logit, their proposal boxes)
             graph_b ◀── memory, ref_boxes[1,Q,4]   ─▶ pred_boxes, pred_logits, query_features
                         │ host: select_mask_queries (predict()'s top-k over Q×C, score > threshold, ≤ K queries)
             graph_c ◀── memory, query_features[1,K,D] ─▶ pred_masks[1,K,h,w]  (masks of those K queries only)

Every graph has named inputs and outputs (its ``serving_default`` signature), so nothing depends on tensor order.

``SplitModel(folder, accelerator="cpu"|"gpu")`` opens the three files: "cpu" with the Interpreter (XNNPACK),
"gpu" with ``CompiledModel`` and LiteRT's GPU accelerator **alone** (compilation fails when any op would need the
CPU; ``fully_accelerated`` records the delegate's own ``is_fully_accelerated()`` per graph).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

try:  # inside nailkit
    from nailkit.portable.io_contract import CPU_KERNELS, make_interpreter
    from nailkit.portable.postprocess import RawOutputs, select_mask_queries, select_proposals
except ImportError:  # inside a bundle: io_contract.py and postprocess.py sit next to this file
    from io_contract import CPU_KERNELS, make_interpreter  # type: ignore[no-redef]
    from postprocess import RawOutputs, select_mask_queries, select_proposals  # type: ignore[no-redef]

GRAPH_NAMES = ("graph_a", "graph_b", "graph_c")
GRAPH_INPUTS = {"graph_a": ("image",), "graph_b": ("memory", "ref_boxes"), "graph_c": ("memory", "query_features")}
GRAPH_OUTPUTS = {"graph_a": ("enc_logits", "enc_boxes", "memory"),
                 "graph_b": ("pred_boxes", "pred_logits", "query_features"), "graph_c": ("pred_masks",)}

RunGraph = Callable[[str, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def run_chain(run_graph: RunGraph, image_nhwc: np.ndarray, *, num_queries: int, slots: int,
              num_select: int = 200, threshold: float = 0.5) -> dict[str, Any]:
    """Graph A → host top-Q → Graph B → host selection → Graph C through ``run_graph(name, feeds) -> outputs``.

    Returns every intermediate (batch kept) plus ``raw``: the canonical ``RawOutputs`` (boxes [Q,4], logits [Q,C],
    masks [K,h,w] with ``mask_queries``) that ``postprocess.postprocess`` turns into detections.
    ``threshold`` is the score a query needs for a mask row; pass a negative value to give the top ``slots``
    queries masks whatever their score (parity checks do).
    """
    a = run_graph("graph_a", {"image": np.ascontiguousarray(image_nhwc, dtype=np.float32)})
    ref, idx = select_proposals(a["enc_logits"][0], a["enc_boxes"][0], num_queries)
    b = run_graph("graph_b", {"memory": a["memory"], "ref_boxes": ref[None]})
    rows, qsel = select_mask_queries(b["pred_logits"][0], b["query_features"][0], num_select=num_select,
                                     threshold=threshold, slots=slots)
    c = run_graph("graph_c", {"memory": a["memory"], "query_features": rows[None]})
    raw = RawOutputs(boxes=b["pred_boxes"][0], logits=b["pred_logits"][0], masks=c["pred_masks"][0],
                     mask_queries=qsel)
    return {**{k: np.asarray(v) for k, v in a.items()}, **{k: np.asarray(v) for k, v in b.items()},
            "pred_masks": np.asarray(c["pred_masks"]), "topk_indices": idx, "mask_queries": qsel, "raw": raw}


class _CpuGraph:
    def __init__(self, path: Path, threads: Optional[int], kernels: str = "xnnpack") -> None:
        self.interpreter = make_interpreter(path, threads, kernels=kernels)
        self.runner = self.interpreter.get_signature_runner()
        self.fully_accelerated = None

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self.runner(**feeds).items()}


class _GpuGraph:
    def __init__(self, path: Path, enforce_f32: bool) -> None:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import GpuOptions, Options

        opts = Options(hardware_accelerators=HardwareAccelerator.GPU, gpu_options=GpuOptions(enforce_f32=enforce_f32))
        t0 = time.perf_counter()
        self.cm = CompiledModel.from_file(str(path), options=opts)
        self.compile_s = time.perf_counter() - t0
        self.fully_accelerated = bool(self.cm.is_fully_accelerated())
        sigs = self.cm.get_signature_list()
        self.sig = list(sigs)[0]
        self.inputs = list(sigs[self.sig]["inputs"])
        self.outputs = list(sigs[self.sig]["outputs"])
        self.in_det = self.cm.get_input_tensor_details(self.sig)
        self.out_det = self.cm.get_output_tensor_details(self.sig)
        self.ins = self.cm.create_input_buffers(0)
        self.outs = self.cm.create_output_buffers(0)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for i, name in enumerate(self.inputs):
            d = self.in_det[name]
            self.ins[i].write(np.ascontiguousarray(np.asarray(feeds[name], dtype=d["dtype"]).reshape(d["shape"])))
        self.cm.run_by_index(0, self.ins, self.outs)
        out = {}
        for i, name in enumerate(self.outputs):
            d = self.out_det[name]
            n = int(np.prod(d["shape"]))
            out[name] = np.asarray(self.outs[i].read(n, np.dtype(d["dtype"]))).reshape(d["shape"])
        return out


class SplitModel:
    """The three graphs of a GPU-target folder (``graph_a.tflite`` …), on the CPU interpreter or the GPU alone."""

    def __init__(self, folder: str | Path, accelerator: str = "cpu", *, threads: Optional[int] = None,
                 enforce_f32: bool = False, cpu_kernels: str = "xnnpack") -> None:
        if accelerator not in ("cpu", "gpu"):
            raise ValueError(f"accelerator must be 'cpu' or 'gpu', not {accelerator!r}")
        if cpu_kernels not in CPU_KERNELS:
            raise ValueError(f"cpu_kernels must be one of {CPU_KERNELS}, not {cpu_kernels!r}")
        self.folder = Path(folder)
        missing = [g for g in GRAPH_NAMES if not (self.folder / f"{g}.tflite").is_file()]
        if missing:
            raise FileNotFoundError(f"{self.folder}: missing {', '.join(m + '.tflite' for m in missing)}; expected "
                                    f"the GPU target's {', '.join(GRAPH_NAMES)} (python -m nailkit convert --target gpu)")
        self.accelerator = accelerator
        self.graphs: dict[str, Any] = {}
        for g in GRAPH_NAMES:
            p = self.folder / f"{g}.tflite"
            try:
                self.graphs[g] = (_GpuGraph(p, enforce_f32) if accelerator == "gpu"
                                  else _CpuGraph(p, threads, cpu_kernels))
            except Exception as exc:  # noqa: BLE001 - re-raised with the file named
                raise RuntimeError(f"{p}: could not be compiled for {accelerator}"
                                   f"{' (GPU accelerator alone)' if accelerator == 'gpu' else ''}: {exc}") from exc
        self.timings_ms: dict[str, list[float]] = {g: [] for g in GRAPH_NAMES}
        shapes = {g: self._input_shapes(g) for g in GRAPH_NAMES}
        self.resolution = int(shapes["graph_a"]["image"][1])
        self.num_queries = int(shapes["graph_b"]["ref_boxes"][1])
        self.mask_slots = int(shapes["graph_c"]["query_features"][1])

    def _input_shapes(self, g: str) -> dict[str, list[int]]:
        m = self.graphs[g]
        if isinstance(m, _GpuGraph):
            return {k: list(m.in_det[k]["shape"]) for k in m.inputs}
        return {k: list(v["shape"]) for k, v in m.runner.get_input_details().items()}

    @property
    def fully_accelerated(self) -> dict[str, Optional[bool]]:
        return {g: m.fully_accelerated for g, m in self.graphs.items()}

    def run_graph(self, name: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out = self.graphs[name](feeds)
        self.timings_ms[name].append((time.perf_counter() - t0) * 1e3)
        missing = set(GRAPH_OUTPUTS[name]) - set(out)
        if missing:
            raise KeyError(f"{self.folder / (name + '.tflite')}: outputs {sorted(missing)} missing; got {sorted(out)}")
        return out

    def run(self, image_nhwc: np.ndarray, *, threshold: float = 0.5, num_select: int = 200) -> dict[str, Any]:
        """``run_chain`` on this model (see there)."""
        return run_chain(self.run_graph, image_nhwc, num_queries=self.num_queries, slots=self.mask_slots,
                         num_select=num_select, threshold=threshold)

    def raw(self, image_nhwc: np.ndarray, *, threshold: float = 0.5, num_select: int = 200) -> RawOutputs:
        return self.run(image_nhwc, threshold=threshold, num_select=num_select)["raw"]
