"""evaluate(): pycocotools mAP + recall/FP at the operating threshold, checked on predictions whose answer is known,
then end to end through a real runner."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nailkit.data.coco_export import ANNOTATIONS, load_split
from nailkit.data.coco_masks import instance_masks
from nailkit.data.synthetic_dataset import CATEGORIES, make_dataset
from nailkit.accuracy.evaluate import evaluate, label_to_category, match_at_threshold
from nailkit.portable.postprocess import Prediction


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "nails"
    make_dataset(out, seed=7, sizes={"train": 1, "valid": 1, "test": 6})
    return out


class OracleRunner:
    """Predicts the ground truth (optionally dropping nails, adding a false positive, or jittering scores)."""

    backend, name, resolution, path, last_ms = "oracle", "oracle", 432, None, 1.0

    def __init__(self, split, drop_every=0, extra_fp=False, class_names=("Nail",), score_scale=1.0):
        self.split, self.drop_every, self.extra_fp, self.class_names = split, drop_every, extra_fp, list(class_names)
        self.score_scale = score_scale

    def predict(self, image, threshold=0.0, num_select=100, mask_threshold=0.0):
        im = next(i for i in self.split.coco["images"] if i["id"] == self._next)  # evaluate() goes in id order
        assert np.asarray(image).shape[:2] == (im["height"], im["width"])
        self._next += 1
        masks = instance_masks(self.split, im)
        keep = [k for k in range(len(masks)) if not (self.drop_every and k % self.drop_every == 0)]
        masks = masks[keep]
        if self.extra_fp:
            fp = np.zeros((1,) + masks.shape[1:], bool)
            fp[0, :10, :10] = True
            masks = np.concatenate([masks, fp])
        boxes = np.zeros((len(masks), 4), np.float32)
        for j, m in enumerate(masks):
            ys, xs = np.nonzero(m)
            boxes[j] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        n = len(masks)
        return Prediction(xyxy=boxes, confidence=(self.score_scale * np.linspace(0.99, 0.9, n)).astype(np.float32) if n else
                          np.zeros(0, np.float32), class_id=np.zeros(n, np.int64), query_index=np.arange(n),
                          mask=masks, class_name=np.array(["Nail"] * n, dtype=object))

    def close(self):
        pass


def _run(ds, **kw):
    split = load_split(ds, "test")
    r = OracleRunner(split, **kw)
    r._next = min(i["id"] for i in split.coco["images"])
    return evaluate(None, ds, runner=r, progress=False)


def test_perfect_predictions_score_one(ds):
    m = _run(ds).metrics
    assert m["mask_map50_95"] == pytest.approx(1.0) and m["mask_map50"] == pytest.approx(1.0)
    assert m["box_map50"] == pytest.approx(1.0) and m["box_map50_95"] > 0.9  # boxes from decoded polygons: ±1 px
    assert m["recall"] == 1.0 and m["fp_per_image"] == 0.0
    assert m["images"] == 6 and m["instances"] == sum(len(instance_masks(load_split(ds, "test"), im))
                                                       for im in load_split(ds, "test").coco["images"])


def test_annotation_id_zero_is_not_taken_for_unmatched(ds, tmp_path):
    """Roboflow numbers annotations from 0; COCOeval alone would count the match with id 0 as a miss."""
    import shutil

    shutil.copytree(ds, tmp_path / "zero")
    f = tmp_path / "zero" / "test" / ANNOTATIONS
    coco = json.loads(f.read_text())
    for n, a in enumerate(coco["annotations"]):
        a["id"] = n
    f.write_text(json.dumps(coco))
    assert _run(tmp_path / "zero").metrics["mask_map50_95"] == pytest.approx(1.0)


def test_missed_nails_and_false_positives_are_counted(ds):
    full = _run(ds).metrics
    half = _run(ds, drop_every=2).metrics
    assert half["recall"] < 0.75 and half["mask_map50"] < full["mask_map50"]
    fp = _run(ds, extra_fp=True).metrics
    assert fp["fp_per_image"] == 1.0 and fp["recall"] == 1.0


def test_operating_points_show_where_low_scores_find_the_nails(ds):
    """Right masks at scores 0.30–0.35: nothing at the bar's 0.5, every nail at 0.3; the false positive (lowest
    score) counts only where its threshold lets it through."""
    from nailkit.accuracy.evaluate import OPERATING_THRESHOLDS

    m = _run(ds, score_scale=0.35, extra_fp=True).metrics
    pts = {p["threshold"]: p for p in m["operating_points"]}
    assert [p["threshold"] for p in m["operating_points"]] == list(OPERATING_THRESHOLDS)
    assert m["recall"] == 0.0 and m["fp_per_image"] == 0.0 and pts[0.5] == {"threshold": 0.5, "recall": 0.0,
                                                                            "fp_per_image": 0.0}
    assert pts[0.1]["recall"] == pts[0.3]["recall"] == 1.0 and pts[0.4]["recall"] == 0.0
    assert pts[0.1]["fp_per_image"] == pts[0.3]["fp_per_image"] == 1.0 and pts[0.4]["fp_per_image"] == 0.0
    full = _run(ds).metrics  # the curve agrees with the operating threshold's own numbers
    p5 = next(p for p in full["operating_points"] if p["threshold"] == 0.5)
    assert p5["recall"] == full["recall"] == 1.0 and p5["fp_per_image"] == full["fp_per_image"] == 0.0
    half = _run(ds, drop_every=2).metrics
    assert all(p["recall"] == pytest.approx(half["recall"]) for p in half["operating_points"])


def test_metrics_stay_finite_json_without_nails_or_detections(ds, tmp_path):
    """A split whose images hold no nail (COCOeval writes -1 there) and a runner that finds nothing both give finite
    metrics that serialise as strict JSON (what the CLI's --json / --rows write with allow_nan=False)."""
    import shutil

    shutil.copytree(ds, tmp_path / "empty")
    f = tmp_path / "empty" / "test" / ANNOTATIONS
    coco = json.loads(f.read_text())
    coco["annotations"] = []
    f.write_text(json.dumps(coco))
    no_nails = _run(tmp_path / "empty", extra_fp=True).metrics
    nothing_found = _run(ds, drop_every=1).metrics
    for m in (no_nails, nothing_found):
        json.dumps(m, allow_nan=False)  # raises on NaN / inf
        for k in ("mask_map50_95", "mask_map50", "box_map50_95", "box_map50", "recall", "fp_per_image"):
            assert 0.0 <= m[k] <= 1.0 or k == "fp_per_image", (k, m[k])
    assert no_nails["instances"] == 0 and no_nails["recall"] == 0.0 and no_nails["fp_per_image"] == 1.0
    assert nothing_found["mask_map50"] == 0.0 and nothing_found["recall"] == 0.0


def test_match_is_one_to_one_and_respects_threshold():
    g = np.zeros((1, 8, 8), bool)
    g[0, :4, :4] = True
    p = np.stack([g[0], g[0]])
    assert match_at_threshold(g, p, np.array([0.9, 0.8]), 0.5) == (1, 1)  # the duplicate is a false positive
    assert match_at_threshold(g, p, np.array([0.4, 0.3]), 0.5) == (0, 0)  # below threshold: neither
    assert match_at_threshold(np.zeros((0, 8, 8), bool), p, np.array([0.9, 0.8]), 0.5) == (0, 2)


def test_label_mapping_follows_rfdetr_and_names():
    coco = {"categories": CATEGORIES, "annotations": [{"category_id": 1}]}
    assert label_to_category(coco, ["Nail"]) == {0: 1}
    # nailkit's random demo names class 0 'background' and class 1 'Nail'
    assert label_to_category(coco, ["background", "Nail"]) == {1: 1}


def test_real_runner_end_to_end_and_cli_json(ds, demo_ckpt, capsys, tmp_path):
    from nailkit.cli import main

    rows = tmp_path / "rows.json"
    assert main(["evaluate", str(demo_ckpt), "--dataset", str(ds), "--max-images", "2", "--json",
                 "--rows", str(rows)]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("mask_map50_95", "mask_map50", "box_map50_95", "box_map50", "recall", "fp_per_image", "threshold",
              "images", "instances"):
        assert k in m
        if k not in ("images", "instances"):
            assert 0.0 <= m[k] <= (1.0 if k != "fp_per_image" else 200)
    assert m["images"] == 2 and m["backend"] == "torch"
    assert len(json.loads(rows.read_text())["images"]) == 2


def test_cli_errors_are_one_line(tmp_path, demo_ckpt, capsys):
    from nailkit.cli import main

    assert main(["evaluate", str(demo_ckpt), "--dataset", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "_annotations.coco.json" in err and str(tmp_path) in err


def test_accuracy_gates_and_quality_bar():
    from nailkit.verify import gates

    assert gates.check("accuracy_fp32", {"d_mask_map50_95_pt": -0.05}) == []
    assert gates.check("accuracy_fp32", {"d_mask_map50_95_pt": -0.2})  # 0.2 pt drop > 0.1
    assert gates.check("accuracy_fp16", {"d_mask_map50_95_pt": +1.0}) == []  # a gain is not a failure
    assert gates.check("accuracy_int8", {"d_mask_map50_95_pt": -2.9}) == []
    assert gates.check("accuracy_int8", {"d_mask_map50_95_pt": float("nan")})  # unmeasured fails
    good = {"mask_map50": 0.9, "recall": 0.95, "fp_per_image": 0.1, "max_score_on_nail_free_photos": 0.2}
    assert gates.check("quality_bar", good) == []
    bad = gates.check("quality_bar", dict(good, recall=0.5, max_score_on_nail_free_photos=0.7))
    assert len(bad) == 2 and "recall" in bad[0] and "nail-free" in bad[1]


def test_static_int8_is_held_to_the_int8_accuracy_gate():
    from nailkit.accuracy import evaluate as ev
    from nailkit.verify import gates

    assert ev.accuracy_stage("w8a8") == ev.accuracy_stage("w8a16") == "accuracy_int8"
    assert ev.accuracy_stage("fp16") == "accuracy_fp16"
    assert gates.check(ev.accuracy_stage("w8a8"), {"d_mask_map50_95_pt": -2.9}) == []
    assert gates.check(ev.accuracy_stage("w8a8"), {"d_mask_map50_95_pt": -3.1})
