"""→ .tflite: the two conversion routes and their cache (convert), quantisation (quantize), flatbuffer passes and the
one flatbuffer reader/writer (passes), and the metadata written into every file (metadata)."""
