"""nailkit: take a fine-tuned RF-DETR segmentation model (RFDETRSegPreview) from PyTorch to TFLite, and prove at each
step that nothing changed on the way. Each pipeline stage is one subpackage (core → portable → model → data → verify →
report → runtime → export → tflite → gpu → accuracy → bench → bundle → train → cli; imports only point down the
pipeline: see pyproject.toml [tool.importlinter] and README.md for the map)."""

__version__ = "0.1.0"

from nailkit.core import offline as _offline  # noqa: E402
from nailkit.core import warnings_filter as _warnings_filter  # noqa: E402

_offline.install()  # HF_HUB_OFFLINE etc.; the socket guard when NAILKIT_OFFLINE=1 (see nailkit/core/offline.py)
_warnings_filter.install()  # known, harmless third-party warnings silenced in one place
