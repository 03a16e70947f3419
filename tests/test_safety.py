"""Issue 19: no user folder is taken over or deleted, memory stays bounded on a 12-MP photo, masks stay exact when
cropped, and every bad input gets one line (exit status 2) naming the file or flag — no traceback.

Cheap by design: no model loads except in the 12-MP child process; every refusal happens before a model loads.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from nailkit.cli import main
from nailkit.model.build import TRAINED_DEMO

REPO = Path(__file__).resolve().parent.parent


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip()


def _jpeg(path: Path, w: int = 64, h: int = 48) -> Path:
    from PIL import Image

    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------------------------------
# cropped masks are the full-size rule, bit for bit
# ------------------------------------------------------------------------------------------------------------------

def test_cropped_and_streamed_masks_equal_full_size_upsampling():
    from nailkit.portable.postprocess import RawOutputs, postprocess
    from nailkit.portable.preprocess import bilinear_resize

    rng = np.random.default_rng(0)
    for trial in range(24):
        h, w = (int(v) for v in rng.integers(4, 30, 2))
        big_h, big_w = int(rng.integers(3, 200)), int(rng.integers(3, 200))
        masks = (rng.standard_normal((10, h, w)) * [0.01, 1, 30][trial % 3]).astype(np.float32)
        if trial % 4 == 0:
            masks[:, : h // 2] = -40.0  # masks that cover part of the image
        if trial % 5 == 0:
            masks = np.round(masks)  # exact ties with the threshold
        raw = RawOutputs(boxes=rng.random((10, 4)), logits=rng.standard_normal((10, 3)), masks=masks)
        for t in (0.0, 0.5, -2.0):
            ref = None
            for fmt in ("full", "crop"):
                pred = postprocess(raw, (big_w, big_h), threshold=0.0, num_select=12, mask_threshold=t,
                                   mask_format=fmt)
                if ref is None:
                    ref = bilinear_resize(masks[pred.query_index], big_h, big_w) > t
                assert np.array_equal(pred.full_masks(), ref), (trial, t, fmt)
                assert [pred.mask_area(i) for i in range(len(pred))] == [int(m.sum()) for m in ref]


# ------------------------------------------------------------------------------------------------------------------
# output folders: never take over or delete what nailkit did not write; nothing half-made after an error
# ------------------------------------------------------------------------------------------------------------------

OUT_COMMANDS = {
    "predict": ["predict", "{ckpt}", "{img}", "--out", "{out}"],
    "convert": ["convert", "{ckpt}", "--out", "{out}", "--precision", "fp32"],
    "export-onnx": ["export-onnx", "{ckpt}", "--out", "{out}"],
    "bundle": ["bundle", "{ckpt}", "--out", "{out}"],
    "make-dataset": ["make-dataset", "{out}", "--train", "0", "--valid", "0", "--test", "1"],
}


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
def test_nonempty_folder_nailkit_did_not_write_is_refused(tmp_path, capsys, command):
    out = tmp_path / "documents"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    fmt = {"ckpt": tmp_path / "never_loaded.pth", "img": _jpeg(tmp_path / "a.jpg"), "out": out}
    rc, err = _run(capsys, [a.format(**fmt) for a in OUT_COMMANDS[command]])
    assert rc == 2 and len(err.splitlines()) == 1 and "--force" in err and "documents" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.docx"] and (out / "thesis.docx").read_text() == "precious"


@pytest.mark.parametrize("command", ["predict", "convert", "export-onnx", "bundle"])
def test_failed_run_leaves_no_new_folders(tmp_path, capsys, command):
    out = tmp_path / "new" / "deeper" / "out"
    fmt = {"ckpt": tmp_path / "missing.pth", "img": _jpeg(tmp_path / "a.jpg"), "out": out}
    rc, err = _run(capsys, [a.format(**fmt) for a in OUT_COMMANDS[command]])
    assert rc == 2 and "missing.pth" in err, err
    assert not (tmp_path / "new").exists()


def test_marker_and_force_let_nailkit_write_without_deleting(tmp_path):
    from nailkit.bundle import _write_folder
    from nailkit.core.outdir import check_output_folder, read_marker

    out = tmp_path / "bundle"
    _write_folder(out, {"model.tflite": "v1", "old_helper.py": "x"})
    assert read_marker(out)["files"] == ["model.tflite", "old_helper.py"]
    (out / "my_notes.txt").write_text("mine")
    check_output_folder(out)  # nailkit's own folder (the marker): accepted without --force
    _write_folder(out, {"model.tflite": "v2"})
    assert (out / "model.tflite").read_text() == "v2" and not (out / "old_helper.py").exists()
    assert (out / "my_notes.txt").read_text() == "mine"  # never listed by nailkit: kept

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("k")
    with pytest.raises(ValueError, match="--force"):
        check_output_folder(foreign)
    check_output_folder(foreign, force=True)
    _write_folder(foreign, {"model.tflite": "v1"})
    assert (foreign / "keep.txt").read_text() == "k" and (foreign / "model.tflite").exists()


def test_make_bundle_does_not_replace_a_folder_by_default(tmp_path):
    from nailkit.bundle import make_bundle

    out = tmp_path / "docs"
    out.mkdir()
    (out / "a.txt").write_text("a")
    with pytest.raises(ValueError, match="--force"):
        make_bundle(tmp_path / "never_loaded.pth", out)
    assert (out / "a.txt").read_text() == "a"


def _coco(tmp_path: Path, images=None, annotations=None, categories=None, name="ds") -> Path:
    split = tmp_path / name / "test"
    split.mkdir(parents=True)
    _jpeg(split / "a.jpg")
    imgs = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}] if images is None else images
    cats = [{"id": 1, "name": "Nail", "supercategory": "none"}] if categories is None else categories
    anns = ([{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "area": 100, "iscrowd": 0,
              "segmentation": [[4, 4, 14, 4, 14, 14, 4, 14]]}] if annotations is None else annotations)
    (split / "_annotations.coco.json").write_text(json.dumps({"images": imgs, "annotations": anns,
                                                              "categories": cats}))
    return tmp_path / name


def test_model_card_refuses_the_shipped_card_and_an_empty_split(tmp_path, capsys):
    shipped = TRAINED_DEMO
    card = shipped.with_suffix(".card.json")
    if not card.exists():
        pytest.skip("no shipped card")
    before = card.read_bytes()
    rc, err = _run(capsys, ["model-card", shipped, "--dataset", _coco(tmp_path)])
    assert rc == 2 and "--force" in err and "shipped" in err, err
    rc, err = _run(capsys, ["model-card", shipped, "--dataset", _coco(tmp_path, images=[], annotations=[],
                                                                       name="empty")])
    assert rc == 2 and "no images" in err, err
    assert card.read_bytes() == before


# ------------------------------------------------------------------------------------------------------------------
# images: the pixel limit, downscaling, Pillow's decompression-bomb guard
# ------------------------------------------------------------------------------------------------------------------

def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG that claims w×h pixels (Pillow reads the size before any pixel)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_pixel_limit_refuses_or_downscales(tmp_path):
    from nailkit.portable.preprocess import ImageError, load_image

    img = _jpeg(tmp_path / "big.jpg", 400, 300)
    with pytest.raises(ImageError, match="limit"):
        load_image(img, max_pixels=10_000)
    small = load_image(img, max_pixels=10_000, downscale=True)
    assert small.shape[0] * small.shape[1] <= 10_000 and abs(small.shape[1] / small.shape[0] - 4 / 3) < 0.1
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(_png_header_only(tmp_path / "bomb.png", 20000, 20000))


# ------------------------------------------------------------------------------------------------------------------
# the table of bad inputs: exit status 2, one line, naming the file or flag, no traceback
# ------------------------------------------------------------------------------------------------------------------

def _bad_files(tmp_path: Path) -> dict[str, Path]:
    import torch

    d = tmp_path / "bad"
    d.mkdir()
    files = {"file": d / "a_file"}
    files["file"].write_text("x")
    torch.save({"model": {1: torch.zeros(2, 2)}}, d / "intkeys.pth")
    torch.save({"model": {"refpoint_embed.weight": 1, "class_embed.bias": "x"}}, d / "nontensor.pth")
    torch.save({"model": {"w": torch.zeros(2, 2)}}, d / "ok_zip.pth")
    data = bytearray((d / "ok_zip.pth").read_bytes())
    n, e = struct.unpack("<HH", data[26:30])  # first member (data.pkl): flip bytes of its pickle
    for k in range(30 + n + e + 2, 30 + n + e + 12):
        data[k] ^= 0x5A
    (d / "corrupt.pth").write_bytes(bytes(data))
    (d / "truncated.pth").write_bytes((d / "ok_zip.pth").read_bytes()[:600])
    for k in ("intkeys", "nontensor", "corrupt", "truncated"):
        files[k] = d / f"{k}.pth"
    files["img"] = _jpeg(d / "a.jpg")
    files["bomb"] = _png_header_only(d / "bomb.png", 20000, 20000)
    return files


_ANN = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "iscrowd": 0,
        "segmentation": [[4, 4, 14, 4, 14, 14, 4, 14]]}
_IMG = {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}
BAD_COCO = {  # name: (images, annotations, categories, expected text)
    "two_point_polygon": (None, [dict(_ANN, segmentation=[[1, 1, 5, 5]])], None, "polygon of 2 points"),
    "empty_polygon": (None, [dict(_ANN, segmentation=[[]])], None, "polygon of 0 points"),
    "no_polygons": (None, [dict(_ANN, segmentation=[])], None, "empty segmentation"),
    "string_bbox": (None, [dict(_ANN, bbox="4,4,10,10")], None, "bbox"),
    "negative_box": (None, [dict(_ANN, bbox=[4, 4, -3, 10])], None, "positive width"),
    "unknown_category": (None, [dict(_ANN, category_id=7)], None, "category_id 7"),
    "duplicate_image_ids": ([_IMG, dict(_IMG)], [], None, "appears twice"),
    "annotation_for_missing_image": (None, [dict(_ANN, image_id=9)], None, "image_id 9"),
    "image_without_height": ([{"id": 1, "file_name": "a.jpg", "width": 64}], [], None, "height"),
    "empty_split": ([], [], None, "no images"),
}


def _table(tmp_path: Path) -> list[tuple[str, list[str], str]]:
    f = _bad_files(tmp_path)
    nope = tmp_path / "never_loaded.pth"
    rows = [
        ("threshold > 1", ["predict", nope, f["img"], "--threshold", "1.5"], "--threshold"),
        ("threshold NaN", ["predict", nope, f["img"], "--threshold", "nan"], "--threshold"),
        ("num-select 0", ["predict", nope, f["img"], "--num-select", "0"], "--num-select"),
        ("threads -1", ["predict", nope, f["img"], "--threads", "-1"], "--threads"),
        ("mask-threshold inf", ["predict", nope, f["img"], "--mask-threshold", "inf"], "--mask-threshold"),
        ("evaluate threshold -0.1", ["evaluate", nope, "--dataset", tmp_path, "--threshold", "-0.1"], "--threshold"),
        ("max-images -1", ["evaluate", nope, "--dataset", tmp_path, "--max-images", "-1"], "--max-images"),
        ("resolution 0", ["evaluate", nope, "--dataset", tmp_path, "--resolution", "0"], "--resolution"),
        ("precision ','", ["convert", nope, "--out", tmp_path / "c", "--precision", ","], "--precision"),
        ("precision fp8", ["convert", nope, "--out", tmp_path / "c", "--precision", "fp8"], "--precision"),
        ("bundle precision fp8", ["bundle", nope, "--out", tmp_path / "c", "--precision", "fp8"], "--precision"),
        ("workbook --only 99", ["workbook", "--only", "99"], "--only"),
        ("make-dataset --train -5", ["make-dataset", tmp_path / "ds", "--train", "-5"], "--train"),
        ("seed -1", ["demo-checkpoint", tmp_path / "d.pth", "--seed", "-1"], "--seed"),
        ("bench threads 0", ["bench", "--threads", "0", "--out", tmp_path / "b"], "--threads"),
        ("empty checkpoint path", ["inspect", ""], "empty path"),
        ("empty --out", ["predict", nope, f["img"], "--out", ""], "empty path"),
        ("--out under a file", ["predict", nope, f["img"], "--out", f["file"] / "sub"], "which is a file"),
        ("--rows under a file", ["evaluate", nope, "--dataset", tmp_path, "--rows", f["file"] / "r.json"],
         "which is a file"),
        ("int keys", ["inspect", f["intkeys"]], "intkeys.pth: state_dict key 1"),
        ("non-tensor values", ["inspect", f["nontensor"]], "nontensor.pth: state_dict entry"),
        ("int keys (export-onnx)", ["export-onnx", f["intkeys"], "--out", tmp_path / "e"], "intkeys.pth"),
        ("corrupt zip", ["inspect", f["corrupt"]], "corrupt.pth: truncated or corrupt"),
        ("truncated", ["inspect", f["truncated"]], "truncated.pth: truncated or corrupt"),
        ("decompression bomb", ["predict", nope, f["bomb"], "--out", tmp_path / "p"], "bomb.png"),
        ("missing --tflite", ["bundle", nope, "--out", tmp_path / "c", "--tflite", tmp_path / "x.tflite"],
         "--tflite"),
    ]
    for name, (imgs, anns, cats, expect) in BAD_COCO.items():
        ds = _coco(tmp_path, imgs, anns, cats, name=name)
        rows.append((f"coco: {name}", ["evaluate", nope, "--dataset", ds], expect))
    return rows


def test_bad_input_table_one_line_each(tmp_path, capsys):
    outcomes = []
    for name, argv, expect in _table(tmp_path):
        rc, err = _run(capsys, argv)
        outcomes.append((name, rc, err))
        assert rc == 2, (name, rc, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert expect in err, (name, expect, err)
        assert "--trusted" not in err or "corrupt" not in name, (name, err)
    print("\n".join(f"{n:32s} rc={rc} {e}" for n, rc, e in outcomes))
    assert not (tmp_path / "p").exists() and not (tmp_path / "c").exists() and not (tmp_path / "e").exists()


# ------------------------------------------------------------------------------------------------------------------
# memory: predict and evaluate on a 12-megapixel photo, in a child under an address-space cap
# ------------------------------------------------------------------------------------------------------------------

def test_12_megapixel_predict_and_evaluate_memory_is_bounded(tmp_path):
    ckpt = TRAINED_DEMO
    if not ckpt.exists():
        pytest.skip("no trained demo model")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_mem_child.py"), str(ckpt), str(tmp_path),
                           "4000", "3000", "10"], capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"12 MP peak RSS: model alone {res['model_mb']} MB, predict {res['predict_mb']} MB, "
          f"evaluate {res['evaluate_mb']} MB")
    assert res["rc"] == 0, res
    for key in ("predict_mb", "evaluate_mb"):
        assert isinstance(res[key], float) and res[key] - res["model_mb"] <= 2048, res
    assert math.isfinite(res["model_mb"])
