"""The model: checkpoint loading and inspection (one content hash), building the rfdetr model and its export mode,
and the sampling rewrites (GridSample alternatives, XNNPACK-friendly ops)."""
