"""One runner per backend with one predict() API: ``base`` (``Runner``, output mapping), ``torch_runner``,
``onnx_runner``, ``tflite_runner`` (what runs a .tflite), ``runners`` (``make_runner``: picks the backend),
``compare`` (every backend vs PyTorch), ``discovery`` (converted files by sidecar), ``predict`` (the CLI)."""
