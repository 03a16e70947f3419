"""``python -m nailkit predict MODEL IMAGE... [--backend] [--threshold] [--out]`` (``cli_predict``): overlay PNGs
``<out>/<stem>_overlay.png`` + ``<out>/detections.json``; an unwritable ``--out`` or an unreadable image is refused
before any model runs (``check_writable_dir``), and every file is written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nailkit.core.artifacts import atomic_write
from nailkit.portable.preprocess import load_image, MAX_PIXELS
from nailkit.report.viz import overlay
from nailkit.runtime.runners import make_runner


def check_writable_dir(out: str | os.PathLike[str]) -> Path:
    """Create ``out`` if needed and prove a file can be written there; raise a clear error otherwise."""
    import tempfile

    out = Path(out)
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out}: --out exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".nailkit-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"{out}: output directory is not writable ({exc.strerror or exc}); pass --out DIR "
                              f"that you can write to") from None
    return out


def _original_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - load_image already named the problem
        return (0, 0)


def cli_predict(args) -> int:
    """One image at a time: load (photos over ``preprocess.MAX_PIXELS`` are downscaled by Pillow), run, post-process
    with cropped masks, draw, write. Memory does not grow with the number of images or detections."""
    from PIL import Image

    images = [Path(p) for p in args.images]
    for p in images:  # every image must be readable before anything is written (decoded one at a time, then freed)
        load_image(p, downscale=True)
    stems = [p.stem for p in images]
    dup = {s for s in stems if stems.count(s) > 1}
    runner = make_runner(args.model, backend=args.backend, threads=args.threads, trusted=args.trusted)
    out = check_writable_dir(args.out)

    records = []
    written = []
    try:
        for i, path in enumerate(images):
            rgb = load_image(path, downscale=True)
            raw, size = runner.predict_raw(rgb)
            pred = runner.postprocess(raw, size, threshold=args.threshold, num_select=args.num_select,
                                      mask_threshold=args.mask_threshold, mask_format="crop")
            stem = f"{path.stem}_{i}" if path.stem in dup else path.stem
            rec = {"image": str(path), "size": list(size), "overlay": str(out / f"{stem}_overlay.png"),
                   "inference_ms": round(runner.last_ms, 2), "count": len(pred), "detections": pred.to_json()}
            orig = _original_size(path)
            if tuple(orig) != tuple(size):
                rec["original_size"] = list(orig)
                rec["downscaled"] = (f"{orig[0]}x{orig[1]} is over {MAX_PIXELS / 1e6:.0f} MP: predicted on a "
                                     f"{size[0]}x{size[1]} copy (boxes and masks in its pixels)")
            records.append(rec)
            img = overlay(rgb, pred)
            del rgb, raw, pred
            written.append(atomic_write(out / f"{stem}_overlay.png",
                                        lambda p, im=img: Image.fromarray(im).save(p, format="PNG")))
            del img
        doc = {"model": str(args.model), "runner": runner.describe(), "threshold": args.threshold,
               "mask_threshold": args.mask_threshold, "num_select": args.num_select or runner.num_select,
               "images": records}
        js = atomic_write(out / "detections.json", lambda p: p.write_text(json.dumps(doc, indent=2)))
    finally:
        runner.close()
    for stem, rec in zip(written, records):
        print(f"{rec['image']}: {rec['count']} detections (> {args.threshold}) -> {stem}")
        if "downscaled" in rec:
            print(f"  {rec['downscaled']}")
    print(f"detections: {js}")
    return 0
