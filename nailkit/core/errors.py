"""nailkit's own error type: a user-facing problem, reported by the CLI as one line (no traceback).

``NailkitError`` subclasses ``ValueError`` so code that already catches ``ValueError`` keeps working. The message names
the file or flag and what was expected.
"""

from __future__ import annotations


class NailkitError(ValueError):
    """A bad input (file, folder, flag value, dataset), with a message naming it and the expectation."""


class UsageError(NailkitError):
    """A command-line value out of range; the message names the flag."""
