"""Tolerances and comparisons: every gate's numbers (gates), tensor/detection parity (parity) and drift over images
(drift)."""
