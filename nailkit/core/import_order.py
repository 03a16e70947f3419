"""One place that enforces the import order of the heavy native libraries.

Measured on our machines (see README, "Import-order traps"):
* ``import tensorflow`` followed by anything that loads triton (litert_torch, rfdetr, torch.export, torch._dynamo)
  segfaults the process (TF 2.20/2.21 + torch 2.14.1). Loading triton *before* tensorflow is fine.
* importing ``onnx`` before ``tensorflow`` can hang a TFLite conversion (rfdetr issue #1322: Abseil symbols).

So: torch → torch._dynamo (loads triton) → tensorflow → onnx. Call ``import_tensorflow()`` instead of importing
tensorflow directly. Heavy conversions also run in their own process (``nailkit.core.subproc``).
"""

from __future__ import annotations

import os
import sys


class ImportOrderError(RuntimeError):
    pass


def load_triton_first() -> None:
    """Load torch and triton (through torch._dynamo) now, before tensorflow can be imported."""
    if "tensorflow" in sys.modules and "torch._dynamo" not in sys.modules:
        raise ImportOrderError(
            "tensorflow was imported before torch._dynamo/triton; loading triton now would segfault this process. "
            "Restart the kernel and import nailkit (or call nailkit.core.import_order.import_tensorflow()) first.")
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (imports triton when available)


def import_tensorflow():
    """Import tensorflow safely: triton first, and before onnx's C extension when possible."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    load_triton_first()
    onnx_first = "onnx" in sys.modules and "tensorflow" not in sys.modules
    import tensorflow as tf

    if onnx_first:
        import warnings

        warnings.warn("onnx was imported before tensorflow; a TFLite conversion in this process may hang "
                      "(rfdetr #1322). nailkit runs conversions in a subprocess for this reason.", stacklevel=2)
    return tf
