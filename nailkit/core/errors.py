"""nailkit's own error type: a user-facing problem, reported by the CLI as one line (no traceback).

``NailkitError`` subclasses ``ValueError`` so code that already catches ``ValueError`` keeps working. The message names
the file or flag and what was expected.
"""

from __future__ import annotations


class NailkitError(ValueError):
    """A bad input (file, folder, flag value, dataset), with a message naming it and the expectation."""


class UsageError(NailkitError):
    """A command-line value out of range; the message names the flag."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message (its type's name when empty), shortened at a word boundary (with "…")
    when longer than ``limit``: what a one-line error quotes from a library's exception."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " …"
