"""``python -m nailkit.train.gpu``: the commands of the GPU training path, run by ``tools/gpu_train.sh``.

here: ``wheels``, ``check-transfer``, ``untrack``, ``restore``, ``assemble``; there: ``install-wheels``,
``machine-train``, ``stage``. The whole flow is in ``nailkit/train/gpu/__init__.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from nailkit.core.paths import REPO_ROOT
from nailkit.train.gpu.chunks import reassemble, stage_call
from nailkit.train.gpu.limits import MiB, TREE_LIMIT, GpuTransferError
from nailkit.train.gpu.machine import machine_train
from nailkit.train.gpu.transfer import check_transfer, ensure_wheel_dir_ignored, restore, untrack
from nailkit.train.gpu.wheels import (PREINSTALLED, ROOTS, WHEEL_DIR, canonical, check_wheels, download_wheels,
                                      installed_versions, requirement_closure, wheels_to_install)


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
