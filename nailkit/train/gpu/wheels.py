"""Wheels: what to carry to the GPU machine beyond what it has preinstalled (walking each package's
``Requires-Dist``), downloading them here, checking the carried set's own requirements, and picking on the machine the
ones to install."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Sequence

from packaging.requirements import Requirement
from packaging.version import Version

from nailkit.train.gpu.limits import GpuTransferError

WHEEL_DIR = ".gpu_wheels"  # ignored by git via .git/info/exclude (added by `wheels`); travels with run(carry=[...])

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


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


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

