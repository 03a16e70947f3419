"""The model: checkpoint loading (checkpoint_loading), inspection (checkpoint_report) and the resolved ``Checkpoint``
with its one content hash (checkpoint), building the rfdetr model and its export mode, and the sampling rewrites
(GridSample alternatives, XNNPACK-friendly ops)."""
