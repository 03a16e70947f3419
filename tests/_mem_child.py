"""Child process for tests/test_memory.py: run ``predict`` and ``evaluate`` on one large photo under an address-space
cap and print peak RSS (JSON on the last stdout line).

usage: python tests/_mem_child.py CKPT WORK_DIR WIDTH HEIGHT CAP_GB
The model's own footprint is measured first (predict on a 64×48 image), then the large photo's runs.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _dataset(root: Path, name: str, w: int, h: int) -> Path:
    """A one-image COCO split with one square instance."""
    import numpy as np
    from PIL import Image

    split = root / "test"
    split.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (max(1, h // 64), max(1, w // 64), 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.NEAREST).save(split / name, quality=90)
    s = min(w, h) // 4
    x0, y0 = w // 3, h // 3
    poly = [x0, y0, x0 + s, y0, x0 + s, y0 + s, x0, y0 + s]
    coco = {"images": [{"id": 1, "file_name": name, "width": w, "height": h}],
            "categories": [{"id": 0, "name": "nails", "supercategory": "none"},
                           {"id": 1, "name": "Nail", "supercategory": "nails"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [x0, y0, s, s], "area": s * s,
                             "segmentation": [poly], "iscrowd": 0}]}
    (split / "_annotations.coco.json").write_text(json.dumps(coco))
    return split / name


def main() -> int:
    ckpt, work, w, h, cap_gb = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    if cap_gb > 0:
        cap = int(cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from nailkit.accuracy import evaluate
    from nailkit.cli import main as nailkit_main
    from nailkit.runtime import predict
    from nailkit.runtime.runners import make_runner

    # one model load for all three runs (predict and evaluate ask make_runner for theirs, each through its own
    # module's binding, so both are patched): the numbers then differ by what the photo costs, not by a second copy of
    # the model
    shared = make_runner(ckpt)
    close = shared.close
    shared.close = lambda: None
    predict.make_runner = evaluate.make_runner = lambda *a, **k: shared

    small = _dataset(work / "small", "small.jpg", 64, 48)
    big = _dataset(work / "big", "big.jpg", w, h)
    out: dict = {}
    rc = nailkit_main(["predict", ckpt, str(small), "--out", str(work / "p0"), "--threshold", "0",
                       "--num-select", "100"])
    out["model_mb"] = round(_peak_mb(), 1)
    for key, argv in (("predict_mb", ["predict", ckpt, str(big), "--out", str(work / "p1"), "--threshold", "0",
                                      "--num-select", "100"]),
                      ("evaluate_mb", ["evaluate", ckpt, "--dataset", str(work / "big"), "--json"])):
        try:
            rc |= nailkit_main(argv)
            out[key] = round(_peak_mb(), 1)
        except MemoryError:
            out[key] = f"MemoryError under the {cap_gb} GB cap (peak so far {_peak_mb():.0f} MB)"
            rc = 1
    out["rc"] = rc
    close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
