"""Output folders: never write into (or delete) a folder nailkit did not make, and leave nothing half-made.

Every command that takes ``--out`` goes through ``guard_output``:

* the folder may be new, empty, or hold ``MARKER`` (``.nailkit-output.json``, written by an earlier nailkit run);
  anything else is refused before any work starts, unless ``--force`` is given (then nailkit writes its files into the
  folder and still deletes nothing it did not write);
* a path that is a regular file, or lies under one, or is empty, is refused with a message saying so;
* if the command fails, the folders it created and left empty (``--out`` itself, its missing parents, empty cache
  folders inside) are removed again; nothing else is touched;
* on success the marker is written (merged with what an earlier run recorded).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from nailkit.core.errors import NailkitError
from nailkit.core.paths import OUTPUT_DIR

MARKER = ".nailkit-output.json"


def read_marker(folder: str | os.PathLike[str]) -> Optional[dict[str, Any]]:
    """The marker's content, or None when ``folder`` holds no (readable) marker."""
    p = Path(folder) / MARKER
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("written_by") == "nailkit" else None


def write_marker(folder: str | os.PathLike[str], command: str, **fields: Any) -> Path:
    """Record that nailkit ``command`` wrote into ``folder`` (keeps what earlier runs recorded)."""
    p = Path(folder) / MARKER
    doc = read_marker(folder) or {}
    doc.update({"written_by": "nailkit", "command": command, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime())})
    doc.update(fields)
    p.write_text(json.dumps(doc, indent=2))
    return p


def check_path(path: str | os.PathLike[str], flag: str = "--out", *, kind: str = "folder") -> Path:
    """Refuse an empty path and a path at or under a regular file (messages name ``flag``)."""
    text = os.fspath(path)
    if not str(text).strip():
        raise NailkitError(f"{flag}: an empty path was given; expected a {kind} name")
    p = Path(text)
    for anc in reversed(p.absolute().parents):
        if anc.exists() and not anc.is_dir():
            raise NailkitError(f"{p}: {flag} lies under {anc}, which is a file, not a folder")
    if kind == "folder" and p.exists() and not p.is_dir():
        raise NailkitError(f"{p}: {flag} exists and is not a folder; expected a folder")
    return p


def _workspaces() -> list[Path]:
    """nailkit's own output area (the repository's ``outputs/``, where caches and notebook outputs live)."""
    import sys

    found = [OUTPUT_DIR]
    model = sys.modules.get("nailkit.model.build")  # tests point DEFAULT_OUTPUT_DIR elsewhere
    if model is not None and getattr(model, "DEFAULT_OUTPUT_DIR", None) is not None:
        found.append(Path(model.DEFAULT_OUTPUT_DIR).resolve())
    return found


def is_nailkit_folder(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` holds ``MARKER`` or lies in nailkit's ``outputs/`` area."""
    if read_marker(folder) is not None:
        return True
    p = Path(folder).resolve()
    return any(p == w or w in p.parents for w in _workspaces())


def check_output_folder(out: str | os.PathLike[str], *, flag: str = "--out", force: bool = False) -> Path:
    """Refuse ``out`` unless it is new, empty, nailkit's own (holds ``MARKER``, or lies in nailkit's ``outputs/``)
    or ``force`` is set."""
    p = check_path(out, flag)
    if p.is_dir() and not force and not is_nailkit_folder(p):
        try:
            nonempty = any(p.iterdir())
        except OSError as exc:
            raise NailkitError(f"{p}: {flag} cannot be listed ({exc.strerror or exc})") from None
        if nonempty:
            raise NailkitError(f"{p}: {flag} is a folder with files that nailkit did not write (no {MARKER}); "
                               f"choose a new or empty folder, or pass --force to write into it (nothing there is "
                               f"deleted)")
    return p


def _existing_dirs(root: Path) -> set[str]:
    if not root.is_dir():
        return set()
    found = {str(root)}
    for dirpath, dirnames, _ in os.walk(root):
        found.update(os.path.join(dirpath, d) for d in dirnames)
    return found


def _prune_new_empty(root: Path, before: set[str], created_parents: list[Path]) -> None:
    """Remove the folders that did not exist before and are empty now (deepest first); nothing else."""
    if root.is_dir():
        for dirpath, _dirnames, _files in os.walk(root, topdown=False):
            if dirpath not in before:
                try:
                    os.rmdir(dirpath)  # fails (and is left) when not empty
                except OSError:
                    pass
    for d in created_parents:  # deepest first
        try:
            os.rmdir(d)
        except OSError:
            break


@contextmanager
def guard_output(out: str | os.PathLike[str], command: str, *, flag: str = "--out", force: bool = False,
                 marker: bool = True) -> Iterator[Path]:
    """Check ``out`` (``check_output_folder``), run the body, then write the marker; on failure remove only the
    empty folders the body created. The body creates ``out`` itself when it needs it."""
    p = check_output_folder(out, flag=flag, force=force)
    missing = [a for a in [p, *p.absolute().parents] if not a.exists()]  # deepest first
    before = _existing_dirs(p)
    try:
        yield p
    except BaseException:
        _prune_new_empty(p, before, [a for a in missing if a != p])
        raise
    if marker and p.is_dir():
        write_marker(p, command)
