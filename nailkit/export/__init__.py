"""PyTorch → ONNX: the verified export (onnx), ONNX graph passes, op-by-op debugging (opscan: the op inventory;
exporters: torch's exporters into memory; bisection: per-submodule export bisection; repros: notebook 02's failures)
and the other export variants (lower resolution, detection-only, TorchScript: variants)."""
