"""The synthetic nail dataset: layout, class layout, determinism, ground truth that matches the pixels, and the
errors a user's own (broken) export gets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nailkit.data.coco_export import ANNOTATIONS, DatasetError, load_split
from nailkit.data.coco_masks import mask_to_polygons
from nailkit.data.synthetic_dataset import CATEGORIES, make_dataset, NAIL_CATEGORY_ID, SPLITS
from nailkit.data.synthetic_scene import BACKGROUND_PHOTOS, render_scene


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "nails"
    make_dataset(out, seed=3, sizes={"train": 12, "valid": 3, "test": 5})
    return out


def test_roboflow_layout_and_seed_class_layout(small):
    for split, n in (("train", 12), ("valid", 3), ("test", 5)):
        coco = json.loads((small / split / ANNOTATIONS).read_text())
        assert len(coco["images"]) == n
        assert coco["categories"] == CATEGORIES  # parent 'nails' + 'Nail', as Roboflow exports it
        assert {a["category_id"] for a in coco["annotations"]} <= {NAIL_CATEGORY_ID}
        for im in coco["images"]:
            with Image.open(small / split / im["file_name"]) as img:
                assert img.format == "JPEG" and img.size == (im["width"], im["height"])
    # rfdetr's label space over it is exactly one class named Nail (num_classes=2 → class head [3, 256])
    from nailkit.accuracy.evaluate import _kept_categories

    assert [c["name"] for c in _kept_categories(json.loads((small / "train" / ANNOTATIONS).read_text()))] == ["Nail"]


def test_same_seed_same_bytes_other_seed_other_bytes(small, tmp_path):
    again = tmp_path / "again"
    make_dataset(again, seed=3, sizes={"train": 12, "valid": 3, "test": 5})
    for split in SPLITS:
        assert (again / split / ANNOTATIONS).read_bytes() == (small / split / ANNOTATIONS).read_bytes()
        for p in sorted((small / split).glob("*.jpg")):
            assert (again / split / p.name).read_bytes() == p.read_bytes()
    other = tmp_path / "other"
    make_dataset(other, seed=4, sizes={"train": 2, "valid": 1, "test": 1})
    assert (other / "train" / "train_00000.jpg").read_bytes() != (small / "train" / "train_00000.jpg").read_bytes()


def test_polygons_match_the_rendered_instances():
    seen = 0
    for i in range(12):
        rgb, inst = render_scene(np.random.default_rng([11, 0, i]))
        assert rgb.shape[:2] == inst.shape and rgb.dtype == np.uint8
        assert 0 <= inst.max() <= 10
        for k in range(1, int(inst.max()) + 1):
            m = inst == k
            from pycocotools import mask as mu

            h, w = m.shape
            rle = mu.merge(mu.frPyObjects(mask_to_polygons(m), h, w))
            back = mu.decode(rle).astype(bool)
            iou = (back & m).sum() / (back | m).sum()
            assert iou > 0.8, (i, k, iou)
            seen += 1
    assert seen >= 12  # scenes do hold nails


def test_dataset_has_negatives_touching_and_many_nail_counts():
    counts = [int(render_scene(np.random.default_rng([5, 0, i]))[1].max()) for i in range(60)]
    assert counts.count(0) >= 3  # hard negatives
    assert max(counts) >= 6 and len(set(counts)) >= 5


def test_held_out_photos_are_never_backgrounds():
    assert not {"astronaut", "coffee", "chelsea", "cat"} & set(BACKGROUND_PHOTOS)


def test_refuses_a_non_empty_folder_and_writes_nothing(tmp_path):
    (tmp_path / "x.txt").write_text("keep")
    with pytest.raises(DatasetError, match="not empty"):
        make_dataset(tmp_path, sizes={"train": 1, "valid": 1, "test": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_load_split_errors_name_the_file(tmp_path, small):
    with pytest.raises(DatasetError, match="no test/_annotations.coco.json"):
        load_split(tmp_path, "test")
    bad = tmp_path / "bad" / "test"
    bad.mkdir(parents=True)
    (bad / ANNOTATIONS).write_text("{not json")
    with pytest.raises(DatasetError, match=r"_annotations.coco.json: not JSON"):
        load_split(tmp_path / "bad", "test")
    (bad / ANNOTATIONS).write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="not COCO annotations .missing annotations, categories"):
        load_split(tmp_path / "bad", "test")
    coco = json.loads((small / "test" / ANNOTATIONS).read_text())
    (bad / ANNOTATIONS).write_text(json.dumps(coco))  # names images that are not there
    with pytest.raises(DatasetError, match=r"names image 'test_00000.jpg' and 4 more, not found"):
        load_split(tmp_path / "bad", "test")
    split = load_split(small, "test")
    assert split.class_names() == ["Nail"]
