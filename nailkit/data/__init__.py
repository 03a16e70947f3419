"""Inputs: the sample photos (samples) and the synthetic COCO nail dataset (dataset)."""
