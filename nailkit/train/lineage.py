"""A model's training history across runs: a run started ``--init-from`` a committed ``.pth`` inherits that file's
runs (its ``nailkit_training`` record), so the packaged model's card lists every run that shaped its weights, each
with its own optimizer steps, wall time, hardware and recipe, and the total.

* ``write_lineage(work, init_from)``: at the start of an ``--init-from`` run, keep the parent's record in the work
  folder (``lineage.json``), so re-packaging later does not depend on the parent file still being there (it is
  usually replaced by the result).
* ``training_runs(lineage, history, steps)``: the full run list, oldest first, for the packaged record.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

LINEAGE_FILE = "lineage.json"
#: What runs recorded before sessions carried their recipe used: rfdetr's own decays (the layer-decay lever came
#: later, 2026-12-02).
RFDETR_DECAYS = {"layer_decay": 0.8, "component_decay": 0.7}


def parent_record(init_from: str | os.PathLike[str], *, trusted: bool = False) -> dict[str, Any]:
    """The parent's lineage entry: its path, sha256 and ``nailkit_training`` record (``{}`` for a checkpoint that
    train-demo did not make, e.g. the researcher's own)."""
    from nailkit.model.checkpoint_loading import load_checkpoint

    path = Path(init_from)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    record = load_checkpoint(path, trusted=trusted).get("nailkit_training") or {}
    return {"init_from": str(path), "sha256": h.hexdigest(), "record": record}


def write_lineage(work: str | os.PathLike[str], init_from: str | os.PathLike[str], *,
                  trusted: bool = False) -> dict[str, Any]:
    """Keep ``init_from``'s training record in ``work/lineage.json``; returns it."""
    entry = parent_record(init_from, trusted=trusted)
    Path(work, LINEAGE_FILE).write_text(json.dumps(entry, indent=2, default=str))
    return entry


def read_lineage(work: str | os.PathLike[str]) -> dict[str, Any] | None:
    p = Path(work, LINEAGE_FILE)
    return json.loads(p.read_text()) if p.exists() else None


def _with_steps(sessions: list[dict[str, Any]], offset: int, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Sessions of one work folder (``global_step`` counts within the folder) with ``steps`` (this session's optimizer
    steps), ``total_steps`` (the weights' steps at its end, ``offset`` + the folder's) and a ``recipe`` (``defaults``
    fill what older records did not keep)."""
    out, before = [], 0
    for s in sessions:
        s = dict(s)
        gs = s.get("global_step")
        if s.get("steps") is None:  # a parent that was itself merged keeps its numbers
            s["steps"] = None if gs is None else int(gs) - before
            s["total_steps"] = None if gs is None else offset + int(gs)
        if gs is not None:
            before = int(gs)
        s["recipe"] = {**defaults, **(s.get("recipe") or {})}
        out.append(s)
    return out


def _recipe_defaults(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("batch_size", "grad_accum_steps", "lr", "lr_encoder", "layer_decay", "component_decay",
            "lr_warmup_steps", "warmup_resolution", "warmup_resolution_steps", "init_from", "precision", "lr_drop")
    got = {k: record[k] for k in keys if k in record}
    if "layer_decay" not in record:
        got.update(RFDETR_DECAYS)
    return got


def training_runs(lineage: dict[str, Any] | None, history: list[dict[str, Any]], steps: int | None,
                  settings: dict[str, Any]) -> tuple[list[dict[str, Any]], int | None]:
    """(every run that shaped the weights, oldest first; the weights' total optimizer steps). ``history`` and
    ``steps`` are this work folder's; ``lineage`` the parent's (``read_lineage``), if the folder started from one."""
    prior: list[dict[str, Any]] = []
    offset = 0
    if lineage and lineage.get("record"):
        rec = lineage["record"]
        prior = _with_steps(rec.get("sessions", []), 0, _recipe_defaults(rec))
        offset = int(rec.get("optimizer_steps") or 0)
    mine = _with_steps(history, offset, _recipe_defaults(settings))
    total = None if steps is None else offset + int(steps)
    return prior + mine, total
