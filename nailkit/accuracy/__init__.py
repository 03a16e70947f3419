"""Accuracy on a labelled split: COCO mAP with pycocotools (evaluate) and mask quality (mask_quality)."""
