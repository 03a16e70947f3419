"""One validation layer for command-line values: every range is checked before any model loads, and each error
names its flag (``UsageError``, reported by the CLI as one line with exit status 2).

``validate_args(args)`` is called by ``nailkit.cli.main`` for every subcommand; the per-flag rules are data
(``RULES``), so a new flag gets its check by adding one row.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

from nailkit.core.errors import UsageError
from nailkit.core.notebooks import notebook_paths

# precisions ``convert`` knows (nailkit.tflite.options: PRECISIONS + EXTRA_PRECISIONS + STATIC_PRECISIONS); kept here as data
# so that checking a flag does not import the converter.
KNOWN_PRECISIONS = ("fp32", "fp16", "int8", "full_int8", "w8a8", "w8a16")


def _number(flag: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UsageError(f"{flag}: expected a number, got {v!r}")
    if isinstance(v, float) and not math.isfinite(v):
        raise UsageError(f"{flag}: expected a finite number, got {v}")
    return float(v)


def probability(flag: str, v: Any) -> None:
    """A score threshold: a number in [0, 1] (NaN refused)."""
    x = _number(flag, v)
    if not 0.0 <= x <= 1.0:
        raise UsageError(f"{flag}: expected a score threshold in [0, 1], got {v}")


def finite(flag: str, v: Any) -> None:
    _number(flag, v)


def positive(flag: str, v: Any) -> None:
    if _number(flag, v) <= 0:
        raise UsageError(f"{flag}: expected a number > 0, got {v}")


def at_least_one(flag: str, v: Any) -> None:
    if _number(flag, v) < 1:
        raise UsageError(f"{flag}: expected an integer >= 1, got {v}")


def non_negative(flag: str, v: Any) -> None:
    if _number(flag, v) < 0:
        raise UsageError(f"{flag}: expected an integer >= 0, got {v}")


def seed(flag: str, v: Any) -> None:
    if not 0 <= _number(flag, v) < 2**32:
        raise UsageError(f"{flag}: expected a seed in [0, 2**32), got {v}")


def resolution(flag: str, v: Any) -> None:
    """Positive and a multiple of 4 (the mask head's stride); the model checks its own patch × window multiple
    (24 for RF-DETR Seg Preview) when it loads, before any work."""
    x = _number(flag, v)
    if x <= 0 or x % 4:
        raise UsageError(f"{flag}: expected a positive input size in pixels that the model's patch grid divides "
                         f"(a multiple of 24 for RF-DETR Seg Preview, e.g. 432), got {v}")


def nonempty_text(flag: str, v: Any) -> None:
    if not isinstance(v, str) or not v.strip():
        raise UsageError(f"{flag}: expected a non-empty value, got {v!r}")


def path_text(flag: str, v: Any) -> None:
    if not isinstance(v, str) or not v.strip():
        raise UsageError(f"{flag}: an empty path was given; expected a file or folder name")


def precisions(flag: str, v: Any) -> None:
    items = v if isinstance(v, list) else [t.strip() for t in str(v).split(",") if t.strip()]
    if not items:
        raise UsageError(f"{flag}: expected a comma list of {', '.join(KNOWN_PRECISIONS)}, got {v!r} (no precision)")
    unknown = [p for p in items if p not in KNOWN_PRECISIONS]
    if unknown:
        raise UsageError(f"{flag}: unknown precision {unknown[0]!r}; expected one of {', '.join(KNOWN_PRECISIONS)}")


def one_precision(flag: str, v: Any) -> None:
    precisions(flag, v)
    if "," in str(v):
        raise UsageError(f"{flag}: expected one precision ({', '.join(KNOWN_PRECISIONS)}), got {v!r}")


def thread_list(flag: str, v: Any) -> None:
    if not v:
        raise UsageError(f"{flag}: expected a comma list of thread counts >= 1, got none")
    for t in v:
        at_least_one(flag, t)


def notebooks(flag: str, v: Any) -> None:
    if v is None:
        return

    if not v:
        raise UsageError(f"{flag}: expected notebook stems or numbers, e.g. 01,03; got none")
    for o in v:
        if not notebook_paths([o]):
            names = ", ".join(p.stem for p in notebook_paths(None))
            raise UsageError(f"{flag}: {o!r} matches no notebook; expected one of {names}")


Rule = tuple[str, str, Callable[[str, Any], None]]  # (attribute, flag, check)

_THREADS: list[Rule] = [("threads", "--threads", at_least_one)]
_RES: list[Rule] = [("resolution", "--resolution", resolution)]

RULES: dict[str, list[Rule]] = {
    "inspect": [("checkpoint", "checkpoint", path_text)],
    "demo-checkpoint": [("out", "out", path_text), ("seed", "--seed", seed)],
    "make-dataset": [("out", "out", path_text), ("seed", "--seed", seed), ("train", "--train", non_negative),
                     ("valid", "--valid", non_negative), ("test", "--test", non_negative)],
    "train-demo": [("out", "--out", path_text), ("minutes", "--minutes", positive), ("epochs", "--epochs", at_least_one),
                   ("batches_per_epoch", "--batches-per-epoch", at_least_one),
                   ("batch_size", "--batch-size", at_least_one), ("grad_accum_steps", "--grad-accum-steps", at_least_one),
                   ("lr", "--lr", positive), ("seed", "--seed", seed)],
    "evaluate": [("model", "model", path_text), ("dataset", "--dataset", path_text), ("split", "--split", nonempty_text),
                 ("threshold", "--threshold", probability), ("max_images", "--max-images", non_negative),
                 ("rows", "--rows", path_text), *_THREADS, *_RES],
    "model-card": [("checkpoint", "checkpoint", path_text), ("dataset", "--dataset", path_text),
                   ("unseen_dataset", "--unseen-dataset", path_text), ("split", "--split", nonempty_text),
                   ("work_dir", "--work-dir", path_text)],
    "export-onnx": [("checkpoint", "checkpoint", path_text), ("out", "--out", path_text),
                    ("opset", "--opset", at_least_one), ("mask_queries", "--mask-queries", at_least_one), *_RES],
    "convert": [("out", "--out", path_text), ("precision", "--precision", precisions),
                ("calibration", "--calibration", at_least_one), ("calibration_dir", "--calibration-dir", path_text),
                ("mask_queries", "--mask-queries", at_least_one), *_RES],
    "predict": [("model", "model", path_text), ("out", "--out", path_text), ("threshold", "--threshold", probability),
                ("mask_threshold", "--mask-threshold", finite), ("num_select", "--num-select", at_least_one),
                *_THREADS],
    "bundle": [("checkpoint", "checkpoint", lambda f, v: None), ("out", "--out", path_text),
               ("precision", "--precision", one_precision), ("tflite", "--tflite", path_text), *_RES],
    "bench": [("runs", "--runs", at_least_one), ("threads", "--threads", thread_list),
              ("artifacts", "--artifacts", path_text), ("out", "--out", path_text)],
    "workbook": [("only", "--only", notebooks)],
}


def validate_args(args: Any, rules: Optional[dict[str, list[Rule]]] = None) -> None:
    """Check ``args`` of ``args.command`` against ``RULES`` (None values are defaults: not checked)."""
    for attr, flag, check in (rules or RULES).get(getattr(args, "command", ""), []):
        v = getattr(args, attr, None)
        if v is not None:
            check(flag, v)
    if getattr(args, "command", "") == "predict":
        for img in args.images:
            path_text("images", img)
