"""PyTorch → ONNX: the verified export (onnx), ONNX graph passes, op-by-op debugging (opscan) and the other export
variants (lower resolution, detection-only, TorchScript: variants)."""
