"""Chunks: the fp32 ``.pth`` back through the device tool's return limits. Split into ``<name>.partNNN`` files with a
sha256 manifest on the machine, staged a few per call into ``$OUT``, and reassembled here with every chunk's and the
whole file's size and sha256 checked."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from nailkit.train.gpu.limits import MiB, RETURN_MAX_CALL, RETURN_MAX_FILE, RETURN_MAX_FILES, GpuTransferError

#: 4 chunks of 15 MiB + the manifest + two small logs: 7 files, < 61 MiB per call.
CHUNK_SIZE = 15 * MiB
CHUNKS_PER_CALL = 4
MANIFEST = "manifest.json"


def split_file(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, chunk_size: int = CHUNK_SIZE,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cut ``path`` into ``<name>.partNNN`` files of ≤ ``chunk_size`` bytes in ``out_dir`` and write ``manifest.json``
    (whole-file size and sha256, each chunk's name, size and sha256, and ``extra``). Returns the manifest."""
    if chunk_size <= 0 or chunk_size > RETURN_MAX_FILE:
        raise GpuTransferError(f"chunk_size {chunk_size}: must be in 1..{RETURN_MAX_FILE} (the per-file return limit)")
    src, out = Path(path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chunks = []
    whole = hashlib.sha256()
    with open(src, "rb") as fh:
        for i in range(10**6):
            data = fh.read(chunk_size)
            if not data:
                break
            whole.update(data)
            name = f"{src.name}.part{i:03d}"
            (out / name).write_bytes(data)
            chunks.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"file": src.name, "size": src.stat().st_size, "sha256": whole.hexdigest(), "chunk_size": chunk_size,
                "chunks": chunks, "chunks_per_call": CHUNKS_PER_CALL, "calls": calls_needed(len(chunks)),
                **(extra or {})}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def calls_needed(n_chunks: int, per_call: int = CHUNKS_PER_CALL) -> int:
    return max(1, -(-n_chunks // per_call))


def stage_call(state_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], call: int, *,
               extra_files: Sequence[str | os.PathLike[str]] = (), per_call: int = CHUNKS_PER_CALL) -> list[Path]:
    """Copy call ``call``'s chunks (``per_call`` of them, in order) and the manifest from ``state_dir`` to ``out_dir``
    (``$OUT``), plus ``extra_files``; check the return limits before copying anything."""
    state, out = Path(state_dir), Path(out_dir)
    manifest = json.loads((state / MANIFEST).read_text())
    chunks = manifest["chunks"][call * per_call:(call + 1) * per_call]
    if not chunks:
        raise GpuTransferError(f"call {call}: no chunks left ({len(manifest['chunks'])} chunks, {per_call} per call)")
    files = [state / c["name"] for c in chunks] + [state / MANIFEST] + [Path(f) for f in extra_files if Path(f).exists()]
    sizes = [f.stat().st_size for f in files]
    if len(files) > RETURN_MAX_FILES or max(sizes) > RETURN_MAX_FILE or sum(sizes) > RETURN_MAX_CALL:
        raise GpuTransferError(f"call {call}: {len(files)} files, largest {max(sizes)} B, {sum(sizes)} B in all: over "
                               f"the return limits ({RETURN_MAX_FILES} files, {RETURN_MAX_FILE} B each, "
                               f"{RETURN_MAX_CALL} B per call)")
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in files:
        shutil.copyfile(f, out / f.name)
        copied.append(out / f.name)
    return copied


def reassemble(dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> dict[str, Any]:
    """Find the manifest and every chunk in ``dirs`` (one folder per device call, in any order), verify each chunk's
    size and sha256 and the whole file's sha256, and write it to ``out`` (atomically). A missing or corrupt chunk is
    refused with its name; nothing is written then. Returns the manifest."""
    folders = [Path(d) for d in dirs]
    manifests = [d / MANIFEST for d in folders if (d / MANIFEST).exists()]
    if not manifests:
        raise GpuTransferError(f"no {MANIFEST} in {', '.join(map(str, folders))}")
    manifest = json.loads(manifests[0].read_text())
    for m in manifests[1:]:
        if json.loads(m.read_text()).get("sha256") != manifest.get("sha256"):
            raise GpuTransferError(f"{m}: a manifest of another file (sha256 differs from {manifests[0]})")
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for c in manifest["chunks"]:
                found = [d / c["name"] for d in folders if (d / c["name"]).exists()]
                if not found:
                    raise GpuTransferError(f"chunk {c['name']} missing (looked in {', '.join(map(str, folders))}); "
                                           f"fetch it with another `stage --call` while the machine is warm")
                data = found[0].read_bytes()
                if len(data) != c["size"] or hashlib.sha256(data).hexdigest() != c["sha256"]:
                    raise GpuTransferError(f"{found[0]}: corrupt chunk ({len(data)} B, sha256 "
                                           f"{hashlib.sha256(data).hexdigest()[:12]}…; the manifest says {c['size']} B, "
                                           f"{c['sha256'][:12]}…)")
                whole.update(data)
                dst.write(data)
        if whole.hexdigest() != manifest["sha256"]:
            raise GpuTransferError(f"{target}: reassembled sha256 {whole.hexdigest()[:12]}… differs from the "
                                   f"manifest's {manifest['sha256'][:12]}…")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return manifest

