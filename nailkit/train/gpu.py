"""Training on a lent GPU machine: the parts of ``tools/gpu_train.sh`` that run there, and the parts that
run here before and after.

The machine (an H200, no network) gets a copy of the working tree (≤ 64 MiB: tracked files + untracked files that are
not ignored + carried paths) and gives back ≤ 8 files of ≤ 16 MiB, ≤ 64 MiB per call, from ``$OUT``; files outside
``$OUT`` survive between calls while it stays warm (30 s). So:

here, before     ``wheel_plan`` / ``python -m nailkit.train.gpu wheels`` lists (and downloads) the wheels that rfdetr's
                 training needs beyond what the machine has preinstalled, walking each package's ``Requires-Dist``;
                 ``check_wheels`` checks the carried folder's own ``Requires-Dist``; ``untrack`` takes the tracked
                 demo model out of the transfer (``git rm --cached`` + a ``.gitignore`` beside it: see ``untrack``
                 for why not ``.git/info/exclude``) and ``check_transfer`` sums what would travel.
there, call 1    ``install-wheels`` (only what is missing or does not satisfy a carried wheel's requirement, ``--no-index
                 --no-deps``), ``machine-train`` (make-dataset with the same seed, train-demo on cuda with a large
                 batch for N minutes, package the fp32 ``.pth``, evaluate the test split, split the ``.pth`` into
                 chunks with a sha256 manifest) and ``stage --call 0``.
there, calls 2…  ``stage --call K`` copies the next chunks (+ the manifest) to ``$OUT`` while the machine is warm.
here, after      ``restore`` puts the model back in the index exactly as it was; ``assemble`` checks every chunk's
                 size and sha256 and the whole file's, refuses a corrupt or missing one, and writes the ``.pth``;
                 ``python -m nailkit model-card`` writes its card.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from nailkit.accuracy.evaluate import evaluate
from nailkit.core.paths import REPO_ROOT
from nailkit.data.dataset import make_dataset
from nailkit.train.demo import train_demo

MiB = 1 << 20
#: What the device tool carries and returns (shared/ENV-NOTES.md, .library/device/README.md).
TREE_LIMIT = 64 * MiB
RETURN_MAX_FILES = 8
RETURN_MAX_FILE = 16 * MiB
RETURN_MAX_CALL = 64 * MiB
#: 4 chunks of 15 MiB + the manifest + two small logs: 7 files, < 61 MiB per call.
CHUNK_SIZE = 15 * MiB
CHUNKS_PER_CALL = 4
MANIFEST = "manifest.json"
WHEEL_DIR = ".gpu_wheels"  # ignored by git via .git/info/exclude (added by `wheels`); travels with run(carry=[...])
TRACKED_MODEL = "data/models/nails_seg_preview.pth"
UNTRACK_STATE = "nailkit-gpu-untracked.json"  # under .git/
EXCLUDE_TAG = "# nailkit gpu_train: out of the transfer for a device call"

#: What rfdetr's training needs on the machine (import names differ: faster_coco_eval, torch_linear_assignment).
ROOTS = ("rfdetr", "supervision", "pycocotools", "faster-coco-eval", "torchmetrics", "torch-hungarian", "simplejpeg")
#: Preinstalled on the lent H200 (shared/ENV-NOTES.md), plus what those packages themselves pull in. Not carried;
#: ``install-wheels`` still checks each carried wheel's requirements against the versions found there.
PREINSTALLED = frozenset({
    "torch", "torchvision", "triton", "pytorch-lightning", "lightning", "lightning-utilities", "transformers", "peft",
    "timm", "accelerate", "opencv-python-headless", "scikit-image", "scipy", "pillow", "pandas", "safetensors",
    "tqdm", "numpy", "huggingface-hub", "tokenizers", "requests", "pyyaml", "packaging", "typing-extensions",
    "filelock", "fsspec", "jinja2", "networkx", "sympy", "mpmath", "regex", "psutil", "urllib3", "idna", "certifi",
    "charset-normalizer", "markupsafe", "setuptools", "imageio", "tifffile", "lazy-loader", "python-dateutil", "pytz",
    "tzdata", "six", "aiohttp", "hf-xet", "attrs", "protobuf"})
#: Never carried even if something asks for it: the machine's own CUDA build of torch must stay; opencv-python
#: would fight opencv-python-headless over cv2 (ENV-NOTES); roboflow/requests-toolbelt are rfdetr[train]'s upload
#: client, not needed to train offline; av (PyAV, 27 MB) is supervision's video I/O, imported only inside its video
#: functions.
NEVER_CARRY = frozenset({"torch", "torchvision", "triton", "opencv-python", "roboflow", "requests-toolbelt", "av"})


class GpuTransferError(ValueError):
    """A chunk, manifest, wheel set or working tree that cannot be used, with a message naming it."""


def canonical(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------------------------------------------------
# Chunks: the fp32 .pth back through the return limits
# --------------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------------
# Wheels: what to carry, checked against each wheel's Requires-Dist
# --------------------------------------------------------------------------------------------------------------------
def _applies(req, extras: Iterable[str] = ()) -> bool:
    """Does a Requirement apply on the machine (linux, CPython 3.12), with ``extras`` asked for?"""
    if req.marker is None:
        return True
    env = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    return any(req.marker.evaluate({**env, "extra": e}) for e in (list(extras) or [""]))


def requirement_closure(roots: Iterable[str], *, preinstalled: Iterable[str] = PREINSTALLED,
                        requires: Callable[[str], Sequence[str] | None] | None = None,
                        version: Callable[[str], str | None] | None = None) -> list[tuple[str, str]]:
    """``(name, version)`` of every package ``roots`` need (their ``Requires-Dist``, no extras, markers for linux
    CPython 3.12), walked transitively through this environment's metadata, minus ``preinstalled`` and
    ``NEVER_CARRY``; versions are this environment's (the ones tested here)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    def _requires(name: str) -> Sequence[str] | None:
        try:
            return metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            return None

    def _version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    requires, version = requires or _requires, version or _version
    skip = {canonical(p) for p in preinstalled} | NEVER_CARRY
    seen: dict[str, str] = {}
    todo = [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name in skip:
            continue
        v = version(name)
        if v is None:
            raise GpuTransferError(f"{name}: not installed here, so its wheel version and requirements are unknown")
        seen[name] = v
        for text in requires(name) or []:
            req = Requirement(text)
            if _applies(req):
                todo.append(canonical(req.name))
    return sorted(seen.items())


def wheel_metadata(whl: str | os.PathLike[str]) -> tuple[str, str, list[str]]:
    """``(name, version, Requires-Dist lines)`` read from a wheel's ``*.dist-info/METADATA``."""
    from email.parser import Parser

    with zipfile.ZipFile(whl) as zf:
        meta = next((n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            raise GpuTransferError(f"{whl}: no .dist-info/METADATA (not a wheel?)")
        msg = Parser().parsestr(zf.read(meta).decode("utf-8"))
    return canonical(msg["Name"]), msg["Version"], msg.get_all("Requires-Dist") or []


def check_wheels(wheel_dir: str | os.PathLike[str], *, installed: dict[str, str] | None = None,
                 preinstalled: Iterable[str] = PREINSTALLED) -> list[str]:
    """Every requirement (no extras; linux CPython 3.12 markers) of every wheel in ``wheel_dir`` must be met by a
    carried wheel (name and version specifier) or by ``installed`` (name → version; on the machine: what is there;
    here: ``preinstalled`` names, versions unknown). Returns the problems, one line each (empty: the set is whole)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    wheels = sorted(Path(wheel_dir).glob("*.whl"))
    carried = {}
    for w in wheels:
        name, ver, reqs = wheel_metadata(w)
        carried[name] = (ver, reqs, w.name)
    have = {canonical(k): v for k, v in (installed or {}).items()}
    if installed is None:
        have = {canonical(p): None for p in preinstalled}
    problems = []
    for name, (ver, reqs, fname) in sorted(carried.items()):
        for text in reqs:
            req = Requirement(text)
            if not _applies(req):
                continue
            dep = canonical(req.name)
            if dep in carried:
                if req.specifier and not req.specifier.contains(Version(carried[dep][0]), prereleases=True):
                    problems.append(f"{fname} needs {text}: carried {dep} {carried[dep][0]} does not satisfy it")
            elif dep in have:
                v = have[dep]
                if v is not None and req.specifier and not req.specifier.contains(Version(v), prereleases=True):
                    problems.append(f"{fname} needs {text}: installed {dep} {v} does not satisfy it (carry a wheel)")
            elif dep not in NEVER_CARRY:
                problems.append(f"{fname} needs {text}: neither carried nor installed")
    return problems


def wheels_to_install(wheel_dir: str | os.PathLike[str], installed: dict[str, str]) -> list[Path]:
    """The carried wheels to install on the machine: those whose package is absent, or whose installed version does
    not satisfy a requirement some carried wheel states (e.g. rfdetr's ``transformers<6,>=5.1``)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    have = {canonical(k): v for k, v in installed.items()}
    meta = {w: wheel_metadata(w) for w in sorted(Path(wheel_dir).glob("*.whl"))}
    specs: dict[str, list] = {}
    for _, (_, _, reqs) in meta.items():
        for text in reqs:
            req = Requirement(text)
            if _applies(req):
                specs.setdefault(canonical(req.name), []).append(req.specifier)
    picked = []
    for w, (name, ver, _) in meta.items():
        v = have.get(name)
        if v is None or any(s and not s.contains(Version(v), prereleases=True) for s in specs.get(name, [])):
            picked.append(w)
    return picked


def installed_versions() -> dict[str, str]:
    from importlib import metadata

    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def download_wheels(plan: Sequence[tuple[str, str]], dest: str | os.PathLike[str]) -> list[Path]:
    """``pip download --no-deps --only-binary=:all:`` for cp312 manylinux x86_64, one pinned wheel per package."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "--platform", "manylinux2014_x86_64", "--platform",
           "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64", "--platform", "any",
           "-d", str(dest), *[f"{n}=={v}" for n, v in plan]]
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


# --------------------------------------------------------------------------------------------------------------------
# The working tree that travels
# --------------------------------------------------------------------------------------------------------------------
def _git(repo: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, **kw)


def transfer_files(repo: str | os.PathLike[str], *, carry: Sequence[str] = (),
                   exclude: Sequence[str] = ()) -> list[tuple[str, int]]:
    """``(path, bytes)`` of what a device call would copy: tracked files, untracked files git does not ignore,
    ``shared/`` if present, and ``carry`` (ignored paths named in the call), minus ``exclude``; largest first."""
    repo = Path(repo)
    listed = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout.decode().split("\0")
    paths = {p for p in listed if p}
    for extra in [*carry, "shared"]:
        base = repo / extra
        if base.is_file():
            paths.add(extra)
        elif base.is_dir() and (extra != "shared" or not base.is_symlink()):
            paths.update(str(p.relative_to(repo)) for p in base.rglob("*") if p.is_file())
    drop = set(exclude)
    rows = []
    for p in sorted(paths):
        if p in drop or any(p.startswith(d.rstrip("/") + "/") for d in drop):
            continue
        f = repo / p
        if f.is_file() and not f.is_symlink():
            rows.append((p, f.stat().st_size))
    return sorted(rows, key=lambda r: -r[1])


def check_transfer(repo: str | os.PathLike[str], *, carry: Sequence[str] = (), exclude: Sequence[str] = (),
                   limit: int = TREE_LIMIT) -> int:
    """Total bytes that would travel; refuses (GpuTransferError naming the largest files) above ``limit``."""
    rows = transfer_files(repo, carry=carry, exclude=exclude)
    total = sum(s for _, s in rows)
    if total > limit:
        top = ", ".join(f"{p} ({s / MiB:.1f} MiB)" for p, s in rows[:5])
        raise GpuTransferError(f"{repo}: {total / MiB:.1f} MiB would travel, over the {limit / MiB:.0f} MiB limit; "
                               f"largest: {top}")
    return total


def untrack(repo: str | os.PathLike[str], paths: Sequence[str] = (TRACKED_MODEL,)) -> list[dict[str, Any]]:
    """Take tracked ``paths`` out of the transfer for a device call: record their index entries (mode, blob, path) in
    ``.git/nailkit-gpu-untracked.json``, ``git rm --cached`` them, and ignore them with a ``.gitignore`` in their own
    folder (created for the call, ignoring itself too). The files stay on disk; ``restore`` undoes it exactly.

    Not ``.git/info/exclude``: it has the lowest precedence, and this repo's ``.gitignore`` un-ignores
    ``!data/models/*.pth``, so an excluded model would still travel as an untracked, not-ignored file. A
    ``.gitignore`` in a deeper folder outranks the top-level one."""
    repo = Path(repo)
    gitdir = Path(_git(repo, "rev-parse", "--absolute-git-dir").stdout.decode().strip())
    state = gitdir / UNTRACK_STATE
    if state.exists():
        raise GpuTransferError(f"{state}: an earlier untrack was not restored; run `python -m nailkit.train.gpu "
                               f"restore` first")
    entries: list[dict[str, Any]] = []
    for p in paths:
        line = _git(repo, "ls-files", "-s", "--", p).stdout.decode().strip()
        if not line:
            continue  # not tracked: nothing to take out
        meta, path = line.split("\t", 1)
        mode, blob, _stage = meta.split()
        ignore = (repo / path).parent / ".gitignore"
        entries.append({"mode": mode, "blob": blob, "path": path, "gitignore": str(ignore.relative_to(repo)),
                        "created": not ignore.exists()})
    state.write_text(json.dumps(entries, indent=2))
    for e in entries:  # (git has no trailing comments: the tag is a comment line of its own)
        ignore = repo / e["gitignore"]
        text = ignore.read_text() if ignore.exists() else ""
        e["lines"] = [EXCLUDE_TAG, f"/{Path(e['path']).name}"] + (["/.gitignore"] if e["created"] else [])
        ignore.write_text(text + ("" if not text or text.endswith("\n") else "\n") + "\n".join(e["lines"]) + "\n")
    state.write_text(json.dumps(entries, indent=2))
    for e in entries:
        _git(repo, "rm", "--cached", "-q", "--", e["path"])
    return entries


def restore(repo: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Put back what ``untrack`` took out: the exact index entries (not the working-tree files, which may have changed
    since) and the ``.gitignore`` lines (or file) it added."""
    repo = Path(repo)
    gitdir = Path(_git(repo, "rev-parse", "--absolute-git-dir").stdout.decode().strip())
    state = gitdir / UNTRACK_STATE
    if not state.exists():
        return []
    entries = json.loads(state.read_text())
    for e in entries:
        ignore = repo / e["gitignore"]
        if ignore.exists():
            lines = ignore.read_text().splitlines()
            block = e.get("lines", [])
            for i in range(len(lines) - len(block), -1, -1):  # our block, once, from the end
                if block and lines[i:i + len(block)] == block:
                    del lines[i:i + len(block)]
                    break
            if e["created"] and not "".join(lines).strip():
                ignore.unlink()
            else:
                ignore.write_text("".join(f"{line}\n" for line in lines))
        _git(repo, "update-index", "--add", "--cacheinfo", f"{e['mode']},{e['blob']},{e['path']}")
    state.unlink()
    return entries


@contextlib.contextmanager
def untracked_for_call(repo: str | os.PathLike[str], paths: Sequence[str] = (TRACKED_MODEL,)) -> Iterator[list]:
    entries = untrack(repo, paths)
    try:
        yield entries
    finally:
        restore(repo)


def ensure_wheel_dir_ignored(repo: str | os.PathLike[str], wheel_dir: str = WHEEL_DIR) -> None:
    """The wheel folder travels only as a carried (ignored) path, never as untracked files."""
    gitdir = Path(_git(Path(repo), "rev-parse", "--absolute-git-dir").stdout.decode().strip())
    exclude = gitdir / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    text = exclude.read_text() if exclude.exists() else ""
    line = f"/{wheel_dir.strip('/')}/"
    if line not in text.splitlines():
        exclude.write_text(text + ("" if not text or text.endswith("\n") else "\n") + line + "\n")


# --------------------------------------------------------------------------------------------------------------------
# On the machine
# --------------------------------------------------------------------------------------------------------------------
def machine_train(state_dir: str | os.PathLike[str], *, minutes: float, batch_size: int, seed: int = 0,
                  eval_seed: int | None = 7, init_from: str | None = None, lr: float = 2e-4,
                  batches_per_epoch: int | None = None, warmup_resolution: int | None = None,
                  warmup_resolution_steps: int = 0, chunk_size: int = CHUNK_SIZE) -> dict[str, Any]:
    """make-dataset (seed ``seed``, and ``eval_seed`` for the unseen-seed split), train-demo on cuda with rfdetr's
    trainer (no layer/component decay), package the fp32 ``.pth``, evaluate it on both test splits, split it into
    chunks with a sha256 manifest under ``state_dir/chunks``. Returns the manifest."""
    import torch

    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    ds = state / f"nails-seed{seed}"
    if not (ds / "dataset.json").exists():
        make_dataset(ds, seed=seed)
    n_train = len(json.loads((ds / "train" / "_annotations.coco.json").read_text())["images"])
    bpe = batches_per_epoch or max(1, -(-n_train // batch_size))  # one pass over train per epoch by default
    out = state / "nails_seg_preview_gpu.pth"
    rec = train_demo(ds, out, minutes=minutes, device="cuda", batch_size=batch_size, lr=lr, lr_encoder=lr,
                     work_dir=state / "work", seed=seed, batches_per_epoch=bpe, epochs=10_000,
                     init_from=init_from, warmup_resolution=warmup_resolution,
                     warmup_resolution_steps=warmup_resolution_steps, num_workers=min(8, os.cpu_count() or 1),
                     eval_backend="faster_coco_eval",
                     note=f"lent GPU ({torch.cuda.get_device_name(0) if torch.cuda.is_available() else '?'}), "
                          f"tools/gpu_train.sh, {minutes} min, batch {batch_size}")
    evals: dict[str, Any] = {}
    splits = [(f"seed{seed}", ds)]
    if eval_seed is not None:
        ds7 = state / f"nails-seed{eval_seed}"
        if not (ds7 / "dataset.json").exists():
            make_dataset(ds7, seed=eval_seed)
        splits.append((f"seed{eval_seed}", ds7))
    for name, d in splits:
        try:
            evals[name] = evaluate(out, d, split="test").metrics
        except Exception as exc:  # noqa: BLE001 - the weights still come back; evaluate again here
            evals[name] = {"error": f"{type(exc).__name__}: {exc}"}
    (state / "eval.json").write_text(json.dumps(evals, indent=2, default=str))
    summary = {"optimizer_steps": rec.get("optimizer_steps"), "best_validation": rec.get("best_validation"),
               "evaluation": evals}
    return split_file(out, state / "chunks", chunk_size=chunk_size, extra={"training": summary})


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nailkit.train.gpu", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("wheels", help="here: list (and with --download fetch) the wheels to carry; check them")
    s.add_argument("--dir", default=WHEEL_DIR)
    s.add_argument("--download", action="store_true")
    s.add_argument("--also", default="", help="comma list of extra packages to carry (e.g. transformers)")
    s = sub.add_parser("check-transfer", help="here: bytes that would travel (model excluded), refused over 64 MiB")
    s.add_argument("--carry", default=WHEEL_DIR)
    sub.add_parser("untrack", help="here: take the tracked demo model out of the transfer (git rm --cached + exclude)")
    sub.add_parser("restore", help="here: put the model back in the index exactly as it was")
    s = sub.add_parser("assemble", help="here: verify the chunks (sha256) and write the .pth")
    s.add_argument("dirs", nargs="+")
    s.add_argument("--out", required=True)
    s = sub.add_parser("install-wheels", help="there: pip install the carried wheels that are missing or unfit")
    s.add_argument("dir", nargs="?", default=WHEEL_DIR)
    s = sub.add_parser("machine-train", help="there: dataset, train on cuda, package, evaluate, chunk")
    s.add_argument("--state", required=True)
    s.add_argument("--minutes", type=float, default=8.0)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=2e-4)
    s.add_argument("--init-from", default=None)
    s.add_argument("--warmup-resolution", type=int, default=None)
    s.add_argument("--warmup-steps", type=int, default=0)
    s = sub.add_parser("stage", help="there: copy call K's chunks + manifest (+ logs) to $OUT")
    s.add_argument("--state", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--call", type=int, required=True)
    s.add_argument("--extra", nargs="*", default=[])
    a = p.parse_args(argv)
    repo = REPO_ROOT
    if a.cmd == "wheels":
        roots = list(ROOTS) + [x for x in a.also.split(",") if x]
        plan = requirement_closure(roots, preinstalled=PREINSTALLED - {canonical(x) for x in a.also.split(",") if x})
        for n, v in plan:
            print(f"{n}=={v}")
        if a.download:
            ensure_wheel_dir_ignored(repo, a.dir)
            download_wheels(plan, repo / a.dir)
            problems = check_wheels(repo / a.dir)
            print("\n".join(problems) if problems else f"{a.dir}: every wheel's Requires-Dist is met")
            return 1 if problems else 0
    elif a.cmd == "check-transfer":
        carry = [c for c in a.carry.split(",") if c]
        total = check_transfer(repo, carry=carry)
        print(f"{total / MiB:.1f} MiB would travel (limit {TREE_LIMIT / MiB:.0f} MiB)")
    elif a.cmd == "untrack":
        print(json.dumps(untrack(repo), indent=2))
    elif a.cmd == "restore":
        print(json.dumps(restore(repo), indent=2))
    elif a.cmd == "assemble":
        m = reassemble(a.dirs, a.out)
        print(f"wrote {a.out}: {m['size']} B, sha256 {m['sha256']} ({len(m['chunks'])} chunks verified)")
        print(json.dumps(m.get("training", {}), indent=2, default=str))
    elif a.cmd == "install-wheels":
        picked = wheels_to_install(a.dir, installed_versions())
        print("installing:", ", ".join(w.name for w in picked) or "nothing")
        if picked:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                            *map(str, picked)], check=True)
        problems = check_wheels(a.dir, installed=installed_versions())
        print("\n".join(problems) if problems else "carried wheels: every Requires-Dist is met")
    elif a.cmd == "machine-train":
        m = machine_train(a.state, minutes=a.minutes, batch_size=a.batch_size, lr=a.lr, init_from=a.init_from,
                          warmup_resolution=a.warmup_resolution, warmup_resolution_steps=a.warmup_steps)
        print(json.dumps({k: v for k, v in m.items() if k != "chunks"}, indent=2, default=str))
    elif a.cmd == "stage":
        for f in stage_call(Path(a.state) / "chunks", a.out, a.call, extra_files=a.extra):
            print(f)
    return 0


if __name__ == "__main__":  # pragma: no cover
    try:
        sys.exit(_main())
    except GpuTransferError as exc:
        print(f"nailkit.train.gpu: error: {exc}", file=sys.stderr)
        sys.exit(2)
