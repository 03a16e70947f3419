"""Inputs: the sample photos (samples), the synthetic nail scenes (synthetic_scene) and the labelled dataset written
from them (synthetic_dataset), reading a Roboflow COCO export (coco_export) and COCO segmentations ↔ masks
(coco_masks)."""
