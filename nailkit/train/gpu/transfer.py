"""The working tree that travels to the GPU machine: what a device call would copy and whether it fits, taking the
tracked demo model out of the transfer (``untrack``) and putting it back exactly (``restore``), and keeping the wheel
folder an ignored, carried path."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator, Sequence

from nailkit.train.gpu.limits import MiB, TREE_LIMIT, GpuTransferError
from nailkit.train.gpu.wheels import WHEEL_DIR

#: the current demo model (``nailkit.model.build.TRAINED_DEMO``)
TRACKED_MODEL = "data/models/nails_seg_preview_v5.pth"
#: what a device call leaves behind: every tracked model under data/models/ (the current one and a superseded one that
#: waits for its deletion: removing it in the submission that adds the next would put both blobs into one
#: submission's diffs, over the 256 MiB limit), whatever their names
TRACKED_MODELS = ("data/models/*.pth",)
UNTRACK_STATE = "nailkit-gpu-untracked.json"  # under .git/
EXCLUDE_TAG = "# nailkit gpu_train: out of the transfer for a device call"


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


def untrack(repo: str | os.PathLike[str], paths: Sequence[str] = TRACKED_MODELS) -> list[dict[str, Any]]:
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
    for p in paths:  # a path or a pathspec glob; what is not tracked has nothing to take out
        for line in _git(repo, "ls-files", "-s", "--", p).stdout.decode().splitlines():
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
def untracked_for_call(repo: str | os.PathLike[str], paths: Sequence[str] = TRACKED_MODELS) -> Iterator[list]:
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

