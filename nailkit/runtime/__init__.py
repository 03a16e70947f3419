"""One runner per backend (PyTorch, ONNX Runtime, a .tflite through LiteRT) with one predict() API (runners)."""
