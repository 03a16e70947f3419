"""Run the nail-segmentation model of this bundle on images. Needs only numpy, Pillow and ai-edge-litert.

    python run_bundle.py photo.jpg [more.jpg ...] [--threshold 0.5] [--mask-threshold 0.0] [--threads 2]
                         [--json detections.json]

As a library (this folder on sys.path)::

    from run_bundle import BundleModel
    model = BundleModel()                      # reads model_card.json next to this file
    pred = model.predict("photo.jpg", threshold=0.5)
    pred.xyxy, pred.confidence, pred.class_id, pred.class_name, pred.mask   # masks: bool [N, H, W], image size

Everything the model expects and returns is written down in model_card.json; preprocess.py and postprocess.py are
the reference implementations (byte-identical to nailkit's).
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

from postprocess import Prediction, RawOutputs, postprocess  # noqa: E402
from preprocess import preprocess  # noqa: E402


class BundleModel:
    """The bundle's .tflite with the pre/post-processing its model card prescribes."""

    def __init__(self, bundle_dir: str | Path = HERE, threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.dir = Path(bundle_dir)
        self.card = json.loads((self.dir / "model_card.json").read_text())
        model_path = self.dir / self.card["model_file"]
        self.interpreter = Interpreter(model_path=str(model_path), num_threads=threads)
        self.interpreter.allocate_tensors()
        inp = self.interpreter.get_input_details()
        if len(inp) != 1:
            raise ValueError(f"{model_path}: expected one input, found {len(inp)}")
        self.input = inp[0]
        spec = self.card["input"]
        if [int(s) for s in self.input["shape"]] != list(spec["shape"]):
            raise ValueError(f"{model_path}: input shape {list(self.input['shape'])} does not match the model card's "
                             f"{spec['shape']}")
        self.layout = spec["layout"]
        self.resolution = int(spec["resolution"])
        by_name = {d["name"]: d for d in self.interpreter.get_output_details()}
        self.outputs = {}
        for o in self.card["outputs"]:
            if o["name"] not in by_name:
                raise ValueError(f"{model_path}: output {o['name']!r} named in the model card is missing")
            self.outputs[o["meaning"]] = (by_name[o["name"]], o)
        self.class_names = self.card["labels"]
        self.num_select = int(self.card["postprocess"]["num_select"])

    def raw(self, image) -> tuple[RawOutputs, tuple[int, int]]:
        """Raw outputs in the canonical layout (boxes [Q,4] cxcywh, logits [Q,C], mask logits [Q,h,w])."""
        x, size = preprocess(image, self.resolution)  # float32 NCHW, ImageNet-normalised
        if self.layout == "NHWC":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        dtype = np.dtype(self.input["dtype"])
        if dtype != np.float32:  # a fully quantised input: quantise with the tensor's own scale/zero-point
            scale, zero = self.input["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        arrays = {}
        for meaning, (detail, spec) in self.outputs.items():
            a = np.array(self.interpreter.get_tensor(detail["index"]))
            scale, zero = detail.get("quantization", (0.0, 0)) or (0.0, 0)
            if a.dtype != np.float32 and scale and meaning != "topk_indices":
                a = (a.astype(np.float32) - np.float32(zero)) * np.float32(scale)
            if spec.get("layout") == "NHWQ":  # masks written as [1, h, w, Q]
                a = a.transpose(0, 3, 1, 2)
            arrays[meaning] = a[0]
        raw = RawOutputs(boxes=arrays["pred_boxes"], logits=arrays["pred_logits"], masks=arrays.get("pred_masks"))
        return raw, size

    def predict(self, image, threshold: float | None = None, mask_threshold: float | None = None) -> Prediction:
        pp = self.card["postprocess"]
        raw, size = self.raw(image)
        return postprocess(raw, size, threshold=pp["threshold"] if threshold is None else threshold,
                           num_select=self.num_select,
                           mask_threshold=pp["mask_threshold"] if mask_threshold is None else mask_threshold,
                           class_names=self.class_names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+")
    p.add_argument("--threshold", type=float, default=None, help="score threshold (default: the model card's)")
    p.add_argument("--mask-threshold", type=float, default=None, help="mask-logit threshold (default 0.0)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the detections here as JSON")
    args = p.parse_args(argv)
    model = BundleModel(threads=args.threads)
    result = {}
    for im in args.images:
        pred = model.predict(im, args.threshold, args.mask_threshold)
        result[str(im)] = pred.to_json()
        print(f"{im}: {len(pred)} detections")
        for d in pred.to_json():
            print(f"  {d['class_name'] or d['class_id']} {d['confidence']:.3f} {d['xyxy']} mask px={d['mask_area']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
