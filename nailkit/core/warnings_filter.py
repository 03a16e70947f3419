"""The one place where known, harmless third-party warnings are silenced, so a researcher reads results, not noise.

Each entry below is a warning we have read, understood and judged harmless for nailkit; everything else stays
visible. ``NAILKIT_SHOW_ALL_WARNINGS=1`` turns this off.

* torch 2.14 deprecates ``torch.jit.script``/``script_method``; rfdetr and torchvision still call them at import.
* torch's pytree registry logs "<enum ...> is an Enum subclass and is now natively supported by torch.compile" when
  a library registers an Enum as a pytree constant at import.
* rfdetr's DINOv2 backbone logs "not loading DINOv2 backbone weights" whenever it is built with patch 12 or with its
  own positional-encoding size — always the case for a checkpoint being loaded, whose weights replace them anyway.
* rfdetr notes at import that its platform downloads need the 'plus' extra; nailkit never downloads.
"""

from __future__ import annotations

import logging
import os
import warnings

#: (category, message regex) pairs passed to ``warnings.filterwarnings("ignore", ...)``
IGNORED_WARNINGS = (
    (FutureWarning, r"`torch\.jit\.script(_method)?` is deprecated"),
    (DeprecationWarning, r"`torch\.jit\.script(_method)?` is deprecated"),
    (ImportWarning, r"The platform model downloads requires the 'plus' extras"),
)
#: {logger name: message fragments dropped from it}
IGNORED_LOG_MESSAGES = {
    "rf-detr": ("not loading DINOv2 backbone weights",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
}


class _DropKnown(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(m in msg for m in self.fragments)


def install() -> bool:
    """Silence the known warnings (idempotent). Returns False when ``NAILKIT_SHOW_ALL_WARNINGS=1``."""
    if os.environ.get("NAILKIT_SHOW_ALL_WARNINGS") == "1":
        return False
    for category, pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, fragments in IGNORED_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(fragments))
    return True
