"""Run the nail-segmentation model of this bundle on images. Needs only numpy, Pillow and ai-edge-litert.

    python run_bundle.py photo.jpg [more.jpg ...] [--threshold 0.5] [--mask-threshold 0.0] [--threads 2]
                         [--json detections.json]

As a library (this folder on sys.path)::

    from run_bundle import BundleModel
    model = BundleModel()                      # reads model_card.json next to this file
    pred = model.predict("photo.jpg", threshold=0.5)
    pred.xyxy, pred.confidence, pred.class_id, pred.class_name, pred.mask   # masks: bool [N, H, W], image size

Everything the model expects and returns is written down in model_card.json; preprocess.py, io_contract.py and
postprocess.py are the reference implementations (byte-identical to nailkit's: the same code nailkit's parity gates
and inference run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # python -I does not put the script's folder on sys.path
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from io_contract import TFLiteModel  # noqa: E402
from postprocess import Prediction, RawOutputs, postprocess  # noqa: E402
from preprocess import load_image, preprocess  # noqa: E402


class BundleModel:
    """The bundle's .tflite with the pre/post-processing its model card prescribes."""

    def __init__(self, bundle_dir: str | Path = HERE, threads: int | None = None, accelerator: str = "cpu") -> None:
        self.dir = Path(bundle_dir)
        self.card = json.loads((self.dir / "model_card.json").read_text())
        self.target = self.card.get("target", "cpu")
        spec = self.card["input"]
        if self.target == "gpu":  # three graphs + host steps (gpu_chain.py); accelerator "cpu" or "gpu"
            from gpu_chain import SplitModel

            self.model = SplitModel(self.dir, accelerator, threads=threads)
            shape = [1, self.model.resolution, self.model.resolution, 3]
            self.layout, self.resolution = "NHWC", self.model.resolution
        else:
            if accelerator != "cpu":
                raise ValueError(f"{self.dir}: a CPU-target bundle; --accelerator gpu needs a --target gpu bundle")
            self.model = TFLiteModel(self.dir / self.card["model_file"], threads)
            shape = list(self.model.input_shape)
            self.layout = self.model.layout
            self.resolution = self.model.resolution
        if shape != list(spec["shape"]):
            raise ValueError(f"{self.dir}: the model's input shape {shape} does not match the model card's "
                             f"{spec['shape']}")
        self.class_names = self.card["labels"]
        self.num_select = int(self.card["postprocess"]["num_select"])

    def raw(self, image, threshold: float | None = None) -> tuple[RawOutputs, tuple[int, int]]:
        """Raw outputs in the canonical layout (boxes [Q,4] cxcywh, logits [Q,C], mask logits [Q,h,w]; the GPU
        target computes masks only for queries scoring above ``threshold``, listed in ``raw.mask_queries``)."""
        x, size = preprocess(image, self.resolution)  # float32 NCHW, ImageNet-normalised
        if self.layout == "NHWC":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        if self.target == "gpu":
            thr = self.card["postprocess"]["threshold"] if threshold is None else threshold
            return self.model.raw(x, threshold=thr, num_select=self.num_select), size
        out = self.model.run(x)  # by meaning, dequantised, masks [1,Q,h,w]
        masks = out.get("pred_masks")
        raw = RawOutputs(boxes=out["pred_boxes"][0], logits=out["pred_logits"][0],
                         masks=None if masks is None else masks[0])
        return raw, size

    def predict(self, image, threshold: float | None = None, mask_threshold: float | None = None,
                mask_upsample: str = "bilinear") -> Prediction:
        """Detections at the original image size. ``mask_upsample``: "bilinear" (rfdetr's rule) or "guided" (then a
        guided-filter refinement along the photo's edges: smoother nail boundaries for AR overlays)."""
        pp = self.card["postprocess"]
        rgb = load_image(image)
        raw, size = self.raw(rgb, threshold)
        return postprocess(raw, size, threshold=pp["threshold"] if threshold is None else threshold,
                           num_select=self.num_select,
                           mask_threshold=pp["mask_threshold"] if mask_threshold is None else mask_threshold,
                           class_names=self.class_names, mask_upsample=mask_upsample,
                           image=rgb if mask_upsample == "guided" else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+")
    p.add_argument("--threshold", type=float, default=None, help="score threshold (default: the model card's)")
    p.add_argument("--mask-threshold", type=float, default=None, help="mask-logit threshold (default 0.0)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--mask-upsample", choices=["bilinear", "guided"], default="bilinear",
                   help="bilinear: rfdetr's rule (default); guided: + edge-aware refinement (smoother AR edges)")
    p.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu",
                   help="GPU-target bundles: run the graphs on LiteRT's GPU accelerator alone (default: CPU)")
    p.add_argument("--json", default=None, help="write the detections here as JSON")
    args = p.parse_args(argv)
    model = BundleModel(threads=args.threads, accelerator=args.accelerator)
    result = {}
    for im in args.images:
        pred = model.predict(im, args.threshold, args.mask_threshold, args.mask_upsample)
        result[str(im)] = pred.to_json()
        print(f"{im}: {len(pred)} detections" + (f" ({pred.dropped} more above the threshold left out: the model's "
                                                   f"mask slots were full)" if pred.dropped else ""))
        for d in pred.to_json():
            print(f"  {d['class_name'] or d['class_id']} {d['confidence']:.3f} {d['xyxy']} mask px={d['mask_area']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
