"""The PyTorch backend: ``TorchRunner(rf, resolution=None, traced=False, threads=None)``.

Eager = nailkit's export-mode module (``nailkit.model.build.export_module``: rfdetr's own export preparation, frozen
position embeddings). ``traced=True`` is rfdetr's ``RFDETR.inference(compile=True)`` path (``torch.jit.trace`` of the
deployment-mode network, which runs on CPU); at a resolution other than the model's, the export-mode module is traced
instead. torch is imported inside the class, so importing this module is cheap.

The eager runner records its two-stage selection like the converted files expose it (``raw.extra``: ``enc_scores``
[1,S], the encoder's max class logit per token, and ``topk_indices`` [1,Q], through
``nailkit.verify.parity.run_torch_with_selection``), and ``run_selected(x, indices)`` re-runs it on another backend's
selection.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from nailkit.model.build import export_module, export_options, export_suffix, validate_resolution
from nailkit.portable.postprocess import RawOutputs
from nailkit.runtime.base import DEFAULT_NUM_SELECT, Runner
from nailkit.verify.parity import run_torch_with_selection, SELECTION_OUTPUT_NAMES


class TorchRunner(Runner):
    """The PyTorch model: eager export-mode module, or rfdetr's traced ``inference(compile=True)`` form."""

    def __init__(self, rf, resolution: Optional[int] = None, *, traced: bool = False,
                 threads: Optional[int] = None, sampling: Optional[str] = None,
                 mask_queries: Optional[int] = None, checkpoint: Optional[os.PathLike] = None) -> None:
        """``sampling`` / ``mask_queries``: ``nailkit.model.build.export_module``'s options (the traced form then traces
        that module instead of rfdetr's own); with ``mask_queries=N`` the outputs hold the N best queries' rows.
        ``checkpoint``: the file ``rf`` was loaded from (``path`` in ``describe()``; optional)."""
        import torch

        self.rf = rf
        self.resolution = validate_resolution(rf, resolution)
        self.threads = threads
        self.traced = bool(traced)
        self.backend = "torch-traced" if traced else "torch"
        self.options = export_options(sampling, mask_queries)
        self.name = self.backend + export_suffix(sampling, mask_queries).replace("_", " ")
        self.input_layout = "NCHW"
        self.path = Path(checkpoint) if checkpoint else None
        self.class_names = list(rf.class_names)
        self.num_select = int(getattr(rf.model.postprocess, "num_select", DEFAULT_NUM_SELECT))
        self._forced: Optional[np.ndarray] = None
        with self._threads():
            if not traced:
                self.module = export_module(rf, self.resolution, **self.options)
                self.output_names = list(self.module.output_names) + list(SELECTION_OUTPUT_NAMES)
                self.how = "nailkit.model.build.export_module (rfdetr prepare_export_graph, eager)"
            elif (not self.options and self.resolution == int(rf.model.resolution)
                  and not getattr(rf, "_is_optimized_for_inference", False)):
                # rfdetr's own path: deepcopy → eval → export() → torch.jit.trace at the model resolution.
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rf.inference(compile=True, batch_size=1)
                self.module = rf.model.inference_model
                rf.remove_optimized_model()  # leave rf.predict() on the eager model, as before
                self.how = "rfdetr RFDETR.inference(compile=True) (torch.jit.trace)"
            else:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    eager = export_module(rf, self.resolution, **self.options)
                    self.module = torch.jit.trace(eager, torch.zeros(1, 3, self.resolution, self.resolution),
                                                  check_trace=False)
                self.how = "torch.jit.trace of nailkit.model.build.export_module"

    def _threads(self):
        import contextlib

        import torch

        if not self.threads:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def ctx():
            old = torch.get_num_threads()
            torch.set_num_threads(int(self.threads))
            try:
                yield
            finally:
                torch.set_num_threads(old)

        return ctx()

    def run_selected(self, x: np.ndarray, indices: np.ndarray) -> RawOutputs:
        """``run`` with the two-stage selection forced to ``indices`` ([Q] or [1,Q]: e.g. another backend's
        ``raw.extra["topk_indices"]``), so each selected proposal gets the content query of its rank there. Eager
        only; given this runner's own selection, bit-identical to ``run``."""
        if self.traced:
            raise ValueError(f"{self.name}: a traced module cannot be run on a forced selection; use the eager runner")
        self._forced = np.asarray(indices, dtype=np.int64).reshape(1, -1)
        try:
            return self.run(x)
        finally:
            self._forced = None

    def _forward(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        with self._threads(), torch.inference_mode():
            if not self.traced:
                out = run_torch_with_selection(self.module, x, forced_indices=self._forced)
                return [out[n] for n in self.output_names]
            out = self.module(torch.from_numpy(x))
        if isinstance(out, dict):
            out = [v for k, v in out.items() if k in ("pred_boxes", "pred_logits", "pred_masks")]
        return [o.detach().cpu().numpy() for o in out if o is not None]

    def close(self) -> None:
        self.module = None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["how"] = self.how
        d.update(self.options)
        return d

