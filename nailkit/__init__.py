"""nailkit: take a fine-tuned RF-DETR segmentation model (RFDETRSegPreview) from PyTorch to TFLite, and prove at each
step that nothing changed on the way. Each pipeline stage is one module; see README.md for the map."""

__version__ = "0.1.0"
