"""The one artifact layer: cache key, sidecar, atomic publication and validity of every file a stage writes.

* **Key** (``artifact_key(stage, checkpoint, params, packages)``): the checkpoint's *content* (``nailkit.model.checkpoint.checkpoint_content``:
  a hash of its tensors and its stored config, not of its file bytes — ``torch.save`` writes the file's own name
  into the archive, so the same weights saved under two names have different bytes), the stage's parameters,
  nailkit's version and the versions of the converters/runtimes the stage uses.
* **Sidecar** ``<file>.json`` next to each artifact: ``{"key", "key_hash", "sha256", "bytes", ...stage meta}``.
* **Publication** (``publish``): a finished file in a staging path is hashed, renamed into place with
  ``os.replace``, and only then is its sidecar written. The caller runs the stage's gate on the staged file
  *before* publishing; a file under its final name with a sidecar has therefore passed its gate.
* **Validity** (``cached``): the sidecar's key equals the wanted key **and** the file's sha256 equals the
  sidecar's. A file edited in place (even to the same size) is not reused.
* **Refusals** (``record_refusal`` / ``refusal``): a file that failed its gate leaves ``<file>.refused.json`` (key +
  failures) instead of itself, so a request for the same key fails at once rather than redoing a slow conversion
  known to fail; ``publish`` of a passing file for that path removes the record.

"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence
from nailkit import __version__
from nailkit.core.envcheck import installed_versions

#: bump when the meaning of a key or of a sidecar changes
CACHE_VERSION = 2


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------

def atomic_write(path: str | os.PathLike[str], writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` then rename into place, so a failure never leaves a half-written ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def file_sha256(path: str | os.PathLike[str], length: int = 12) -> str:
    """Hex sha256 of a file's bytes, cut to ``length`` characters (``length=64``: the full digest)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


@contextlib.contextmanager
def staging(dst: str | os.PathLike[str]) -> Iterator[Path]:
    """A private scratch folder beside ``dst`` (same file system, so ``publish`` is a rename); removed on exit."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".work", dir=dst.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# the key
# ----------------------------------------------------------------------------------------------------------------

def package_versions(packages: Sequence[str]) -> dict[str, Optional[str]]:
    """Installed versions of ``packages`` (None when absent); nailkit's own is always included."""
    return {"nailkit": __version__, **installed_versions(list(packages))}


def artifact_key(stage: str, checkpoint: str, params: dict[str, Any], packages: Sequence[str] = ()
                 ) -> tuple[str, dict[str, Any]]:
    """``(short hash, key dict)`` of a stage's artifact: checkpoint content + parameters + versions."""
    key = {"stage": stage, "cache_version": CACHE_VERSION, "checkpoint_content": checkpoint,
           "params": json.loads(json.dumps(params, sort_keys=True, default=str)),
           "versions": package_versions(packages)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16], key


# ----------------------------------------------------------------------------------------------------------------
# sidecar, publication, validity
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Artifact:
    """A published, gated file and its sidecar meta. Unpacks as ``path, meta = artifact``."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.path, self.meta))


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".json")


def read_sidecar(path: str | os.PathLike[str]) -> Optional[dict[str, Any]]:
    """The sidecar of ``path`` as a dict, or None when missing or unreadable."""
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def write_sidecar(path: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    return atomic_write(sidecar_path(path), lambda tmp: tmp.write_text(json.dumps(meta, indent=1, default=str)))


def cached(path: str | os.PathLike[str], key: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The sidecar meta when ``path`` is a valid artifact for ``key`` (same key, same content hash), else None."""
    p = Path(path)
    if not p.is_file():
        return None
    meta = read_sidecar(p)
    if not meta or meta.get("key") != key or meta.get("sha256") != file_sha256(p, 64):
        return None
    return meta


def publish(staged: str | os.PathLike[str], dst: str | os.PathLike[str], meta: dict[str, Any]) -> Artifact:
    """Move a finished, gated ``staged`` file to ``dst`` and write its sidecar (last). Returns the Artifact."""
    staged, dst = Path(staged), Path(dst)
    meta = dict(meta, sha256=file_sha256(staged, 64), bytes=staged.stat().st_size)
    dst.parent.mkdir(parents=True, exist_ok=True)
    sidecar_path(dst).unlink(missing_ok=True)  # an old sidecar must never describe the new file
    refusal_path(dst).unlink(missing_ok=True)  # a file that passed its gate supersedes an earlier refusal
    os.chmod(staged, 0o644)
    os.replace(staged, dst)
    write_sidecar(dst, meta)
    return Artifact(dst, meta)


# ----------------------------------------------------------------------------------------------------------------
# refusals: a gate that failed is remembered like a file that passed
# ----------------------------------------------------------------------------------------------------------------

def refusal_path(path: str | os.PathLike[str]) -> Path:
    """``<file>.refused.json``: the record that ``path`` was produced for a key and failed its gate."""
    p = Path(path)
    return p.with_name(p.name + ".refused.json")


def record_refusal(path: str | os.PathLike[str], key: dict[str, Any], failures: Sequence[str],
                   **meta: Any) -> Path:
    """Remember that the artifact ``path`` for ``key`` failed its gate with ``failures`` (the file itself was never
    published). A later request for the same key can then refuse at once instead of redoing a conversion that is
    known to fail (``refusal``); a file published later for the key supersedes the record (``publish`` removes it)."""
    import time

    rec = {"key": key, "failures": list(failures), "recorded": time.strftime("%Y-%m-%d %H:%M:%S"), **meta}
    return atomic_write(refusal_path(path), lambda tmp: tmp.write_text(json.dumps(rec, indent=1, default=str)))


def refusal(path: str | os.PathLike[str], key: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The refusal record of ``path`` when it was made for this very ``key`` (same checkpoint content, parameters
    and versions), else None: a new converter version or new weights get a fresh try."""
    try:
        rec = json.loads(refusal_path(path).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("key") == key else None
