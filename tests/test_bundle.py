"""The mobile bundle: built once from the route-B fp32 .tflite (cached, shared with notebook 04), then run in a fresh
process where only numpy + Pillow + ai-edge-litert can be imported. Its detections must equal nailkit's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nailkit import bundle
from nailkit.verify import gates
from nailkit.core.outdir import MARKER
from nailkit.core.paths import PORTABLE_DIR

pytestmark = pytest.mark.slow
ALLOWED = ("numpy", "PIL", "ai_edge_litert")
BUNDLE_RES = 240
BLOCKED = ("torch", "nailkit", "supervision", "tensorflow", "onnxruntime", "rfdetr", "scipy", "cv2")


@pytest.fixture(scope="module")
def tflite_file(outputs_dir, demo_ckpt):
    from nailkit.tflite.convert import ensure_tflite

    # the random-weight demo at 240 px: the bundle code is the same at any resolution, and this file exists only for
    # these tests (a 432 conversion cost CI ~3 more minutes); the trained model's 432 bundle is the GPU one below
    path, _ = ensure_tflite(demo_ckpt, outputs_dir, route="litert", precision="fp32", resolution=BUNDLE_RES)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, demo_ckpt, tflite_file):
    from nailkit.data.samples import sample_images

    out = tmp_path_factory.mktemp("b") / "nail_bundle"
    return bundle.make_bundle(demo_ckpt, out, tflite=str(tflite_file), route="litert",
                              images=sample_images("photos")[:2], latency_runs=2, latency_threads=(1,))


def isolated_site(root: Path) -> Path:
    """A folder holding only numpy, Pillow and ai-edge-litert (symlinks into the venv), nothing else."""
    import importlib

    site = root / "site"
    site.mkdir()
    for name in ALLOWED:
        pkg = Path(importlib.import_module(name).__file__).parent
        (site / name).symlink_to(pkg)
        for libs in pkg.parent.glob(f"{ {'PIL': 'pillow'}.get(name, name) }.libs"):
            (site / libs.name).symlink_to(libs)
    return site


LAUNCHER = r"""
import sys, runpy
site, script = sys.argv[1], sys.argv[2]
sys.path.insert(0, site)
blocked = sys.argv[3].split(",")
for name in blocked:
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"isolation broken: {name} is importable")
sys.argv = [script] + sys.argv[4:]
runpy.run_path(script, run_name="__main__")
leaked = sorted({m.split(".")[0] for m in sys.modules} & set(blocked))
if leaked:
    raise SystemExit(f"bundle imported {leaked}")
"""


def run_isolated(bundle_dir: Path, tmp_path: Path, photo: Path, *args: str) -> list[dict]:
    """Copy the bundle to an 'app' folder, run its run_bundle.py on ``photo`` in a fresh interpreter that can import
    numpy, Pillow and ai-edge-litert only, and return its detections (the --json output)."""
    app = tmp_path / "app"
    if not app.exists():
        shutil.copytree(bundle_dir, app)
    site = tmp_path / "site" if (tmp_path / "site").exists() else isolated_site(tmp_path)
    out_json = tmp_path / f"det{len(list(tmp_path.glob('det*.json')))}.json"
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, str(site), str(app / "run_bundle.py"),
                           ",".join(BLOCKED), str(photo), *args, "--json", str(out_json)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out_json.read_text())[str(photo)]


def test_bundle_contents(built, tflite_file):
    names = sorted(p.name for p in built.iterdir())
    # + nailkit's marker (nailkit.core.outdir.MARKER): it lists the bundle's files, so a rebuild replaces only those
    assert names == [MARKER, "README.md", "io_contract.py", "labels.txt", "model.tflite", "model_card.json",
                     "postprocess.py", "preprocess.py", "run_bundle.py"]
    repo = PORTABLE_DIR  # nailkit/portable/: copied verbatim
    for name in ("postprocess.py", "preprocess.py", "io_contract.py"):  # the code nailkit itself runs
        assert (built / name).read_bytes() == (repo / name).read_bytes(), name
    assert "from io_contract import TFLiteModel" in (built / "run_bundle.py").read_text()
    assert (built / "model.tflite").read_bytes() == Path(tflite_file).read_bytes()
    card = json.loads((built / "model_card.json").read_text())
    assert (built / "labels.txt").read_text().splitlines() == card["labels"] == ["background", "Nail"]
    inp = card["input"]
    assert inp["shape"] == [1, BUNDLE_RES, BUNDLE_RES, 3] and inp["layout"] == "NHWC" and inp["dtype"] == "float32"
    assert inp["colour_order"] == "RGB" and "no antialias" in inp["resize"]
    assert inp["mean"] == pytest.approx([0.485, 0.456, 0.406]) and inp["std"] == pytest.approx([0.229, 0.224, 0.225])
    meanings = {o["meaning"]: o for o in card["outputs"]}
    assert meanings["pred_boxes"]["shape"] == [1, 200, 4]
    assert meanings["pred_logits"]["shape"] == [1, 200, 3] and "LOGITS" in meanings["pred_logits"]["values"]
    m = BUNDLE_RES // 4  # masks at a quarter of the input
    assert meanings["pred_masks"]["shape"][1:] in ([200, m, m], [m, m, 200])
    assert len(card["postprocess"]["steps"]) == 5 and card["postprocess"]["num_select"] == 200
    assert card["parity"]["matched"] == card["parity"]["of"] == 20  # fp32: every top-10 detection matches
    assert card["parity"]["min_mask_iou"] >= gates.GATES["consistency_fp32"]["min_mask_iou"]
    assert card["latency"]["by_threads"]["1"]["median_ms"] > 0
    assert card["versions"]["rfdetr"] and card["versions"]["converter"]["route"] == "litert"
    readme = (built / "README.md").read_text()
    assert "random-weight demo" in readme and "sigmoid" in readme


def test_bundle_runs_with_only_numpy_pillow_litert(built, tmp_path):
    """Copy the bundle elsewhere, run it in a fresh isolated interpreter, compare with nailkit's detections."""
    from nailkit.data.samples import sample_images
    from nailkit.runtime.runners import make_runner

    photo = sample_images("photos")[0]
    got = run_isolated(built, tmp_path, photo, "--threshold", "0.0")
    ref = make_runner(str(tmp_path / "app" / "model.tflite"), backend="tflite").predict(photo, threshold=0.0, num_select=200)
    ref.class_name = np.array([["background", "Nail"][c] if c < 2 else "__background__" for c in ref.class_id],
                              dtype=object)
    want = ref.to_json()
    assert len(got) == len(want) == 200
    for g, w in zip(got, want):
        assert g["class_id"] == w["class_id"] and g["query_index"] == w["query_index"]
        assert g["xyxy"] == pytest.approx(w["xyxy"], abs=0.01)
        assert g["confidence"] == pytest.approx(w["confidence"], abs=1e-6)
        assert g["mask_area"] == w["mask_area"]
        assert g["class_name"] == w["class_name"]


def test_isolation_really_blocks_torch(tmp_path):
    site = isolated_site(tmp_path)
    proc = subprocess.run([sys.executable, "-I", "-S", "-c",
                           f"import sys; sys.path.insert(0, {str(site)!r}); import numpy, PIL.Image; "
                           f"from ai_edge_litert.interpreter import Interpreter; import torch"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr


@pytest.fixture(scope="module")
def nameless_ckpt(tmp_path_factory, demo_ckpt):
    """The demo checkpoint with no class names in its args, like rfdetr's COCO-pretrained and bare checkpoints."""
    import torch

    c = torch.load(demo_ckpt, map_location="cpu", weights_only=False)  # nailkit's own demo file
    args = c["args"]
    if isinstance(args, dict):
        args.pop("class_names", None)
    else:
        args.class_names = None
    path = tmp_path_factory.mktemp("nameless") / "bare_seg.pth"
    torch.save(c, path)
    return path


def test_checkpoint_without_class_names_converts_and_bundles_by_default(nameless_ckpt, tmp_path, outputs_dir):
    """`bundle CKPT --out DIR` with no path flags: the default path (litert-torch + xnn sampling, fp32) converts a
    checkpoint that names no classes; labels, the embedded metadata and the card say "unnamed" with the head's class
    ids, and the card says which path was chosen and why. At 240 px to keep CI short (same code path as 432)."""
    from nailkit.tflite import metadata as tflite_metadata
    from nailkit.cli import build_parser
    from nailkit.data.samples import sample_images

    args = build_parser().parse_args(["bundle", str(nameless_ckpt), "--out", str(tmp_path / "b")])
    assert (args.route, args.sampling, args.precision) == (None, None, "fp32")  # the CLI hands make_bundle the defaults
    out = tmp_path / "bundle"
    bundle.make_bundle(nameless_ckpt, out, resolution=BUNDLE_RES, images=sample_images("photos")[:2],
                       latency_runs=2, latency_threads=(1,))
    card = json.loads((out / "model_card.json").read_text())
    assert card["labels"] == ["unnamed_0", "unnamed_1"]
    assert (out / "labels.txt").read_text().splitlines() == ["unnamed_0", "unnamed_1"]
    md = tflite_metadata.read_metadata(out / "model.tflite")
    assert md["class_names"] == ["unnamed_0", "unnamed_1"] and md["num_classes"] == 2
    assert md["extra"]["class_names_source"].startswith("unnamed") and md["extra"]["sampling"] == "xnn"
    path = card["path"]
    assert (path["route"], path["sampling"], path["precision"], path["chosen"]) == ("litert", "xnn", "fp32", "default")
    assert "fastest" in path["why"] and path["gate"]["forced_max_abs"] <= gates.GATES["tflite_fp32"]["forced_max_abs"]
    assert path["xnnpack"]["ops"] >= 0.99 * path["xnnpack"]["of"] and path["xnnpack"]["partitions"] <= 3


def test_corrupt_tflite_refused_and_nothing_written(tmp_path, demo_ckpt):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00" * 200)
    out = tmp_path / "bundle"
    with pytest.raises(ValueError, match="TFL3"):
        bundle.make_bundle(demo_ckpt, out, tflite=str(bad))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]  # no temp folder left behind


def test_cli_errors_are_one_line(tmp_path, demo_ckpt, capsys):
    from nailkit.cli import main

    target = tmp_path / "a_file"
    target.write_text("x")
    assert main(["bundle", str(demo_ckpt), "--out", str(target), "--tflite", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a folder" in err[0]
    assert main(["bundle", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def gpu_built(tmp_path_factory, outputs_dir):
    from nailkit.data.samples import sample_images

    out = tmp_path_factory.mktemp("g") / "nail_gpu_bundle"
    return bundle.make_bundle("", out, target="gpu", output_dir=outputs_dir, images=sample_images("all"),
                              latency_runs=1)


def test_gpu_bundle_contents(gpu_built):
    from nailkit.tflite import metadata as tflite_metadata

    names = sorted(p.name for p in gpu_built.iterdir())
    assert names == [MARKER, "README.md", "gpu_chain.py", "graph_a.tflite", "graph_b.tflite", "graph_c.tflite",
                     "io_contract.py", "labels.txt", "model_card.json", "postprocess.py", "preprocess.py",
                     "run_bundle.py"]
    repo = PORTABLE_DIR  # nailkit/portable/: copied verbatim
    for name in ("postprocess.py", "preprocess.py", "gpu_chain.py"):
        assert (gpu_built / name).read_bytes() == (repo / name).read_bytes(), name
    card = json.loads((gpu_built / "model_card.json").read_text())
    assert card["target"] == "gpu" and (gpu_built / "labels.txt").read_text().splitlines() == card["labels"]
    assert card["input"]["shape"] == [1, 432, 432, 3] and card["num_queries"] == 200
    assert [i["name"] for i in card["graphs"]["graph_b"]["inputs"]] == ["memory", "ref_boxes"]
    assert card["parity_cpu_interpreter"]["matched"] == card["parity_cpu_interpreter"]["of"] == 60
    for g in ("graph_a", "graph_b", "graph_c"):  # each file carries its own metadata
        assert tflite_metadata.read_metadata(gpu_built / f"{g}.tflite")["graph"]["name"] == g
    assert "select_proposals" in (gpu_built / "README.md").read_text()


def test_gpu_bundle_runs_with_only_numpy_pillow_litert(gpu_built, tmp_path):
    """The GPU bundle's host steps + CPU interpreter in an isolated interpreter equal nailkit's chain."""
    from nailkit.data.samples import sample_images
    from nailkit.portable.gpu_chain import SplitModel
    from nailkit.portable.postprocess import postprocess
    from nailkit.portable.preprocess import preprocess

    photo = sample_images("synthetic")[0]
    got = run_isolated(gpu_built, tmp_path, photo, "--threshold", "0.1")
    app = tmp_path / "app"
    x, size = preprocess(photo, 432)
    raw = SplitModel(app, "cpu").raw(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), threshold=0.1)
    labels = (app / "labels.txt").read_text().splitlines()
    want = postprocess(raw, size, threshold=0.1, class_names=labels).to_json()
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert (g["class_id"], g["query_index"], g["mask_area"]) == (w["class_id"], w["query_index"], w["mask_area"])
        assert g["class_name"] == w["class_name"]
        assert g["confidence"] == pytest.approx(w["confidence"], abs=1e-6)
    # the edge-aware mask option runs torch-free too: same detections, refined masks
    guided = run_isolated(gpu_built, tmp_path, photo, "--threshold", "0.1", "--mask-upsample", "guided")
    assert [(d["query_index"], d["xyxy"]) for d in guided] == [(d["query_index"], d["xyxy"]) for d in got]
    assert any(d["mask_area"] != g["mask_area"] for d, g in zip(guided, got))


def test_measure_parity_compares_a_near_tied_selection_on_the_files_selection(monkeypatch):
    """The bundle's parity: on an image whose .tflite selection differs from PyTorch's only between near-tied encoder
    scores, the numbers are against PyTorch re-run on the .tflite's selection, and the plain comparison is kept."""
    from nailkit.portable.postprocess import RawOutputs
    from nailkit.report.bundle_readme import _ties

    scores = np.array([[6.0, 5.0, 4.0, 3.0, 3.0 - 1e-6, 1.0]], np.float32)

    def raw(idx, seed):
        rng = np.random.default_rng(seed)
        q = len(idx)
        boxes = np.concatenate([rng.uniform(0.2, 0.8, (q, 2)), rng.uniform(0.05, 0.3, (q, 2))], 1)
        r = RawOutputs(boxes=boxes, logits=rng.normal(0, 2, (q, 2)), masks=rng.normal(0, 1, (q, 8, 8)))
        r.extra.update(topk_indices=np.asarray(idx, np.int64)[None], enc_scores=scores)
        return r

    torch_sel, tied, apart = [0, 1, 2, 3], [0, 1, 2, 4], [0, 1, 2, 5]
    file_raws = {"a.jpg": raw(torch_sel, 1), "b.jpg": raw(tied, 2), "c.jpg": raw(apart, 3)}
    forced_calls = []

    class FakeTorch:
        def __init__(self, rf, resolution):
            self.image = None

        def run(self, x):
            name = ["a.jpg", "b.jpg", "c.jpg"][int(x.flat[0])]
            self.image = name
            return raw(torch_sel, 1) if name == "a.jpg" else raw(torch_sel, 9)  # b, c: other detections

        def run_selected(self, x, indices):
            forced_calls.append((self.image, np.asarray(indices).ravel().tolist()))
            return raw(tied, 2)  # on the file's selection PyTorch gives the file's detections

    class FakeRunner:
        resolution = 4

    images = ["a.jpg", "b.jpg", "c.jpg"]
    monkeypatch.setattr(bundle, "tflite_raw", lambda path, ims: ([file_raws[i] for i in ims], [(40, 40)] * 3,
                                                                FakeRunner()))
    monkeypatch.setattr(bundle, "TorchRunner", FakeTorch)
    monkeypatch.setattr(bundle, "preprocess", lambda im, res: (np.full((1, 3, res, res), images.index(im),
                                                                       np.float32), (40, 40)))
    d = bundle.measure_parity("m.tflite", rf=None, images=images)
    assert d["selection"] == {"a.jpg": "same", "b.jpg": "tie", "c.jpg": "differs"}
    assert forced_calls == [("b.jpg", tied)]  # only the tie is re-run, on the file's selection
    # a and b agree (b through the forced run), c does not: 20 of its 30 top detections are a's and b's
    forced_only = bundle.drift_summary([file_raws["a.jpg"], file_raws["b.jpg"]], [file_raws["a.jpg"],
                                       file_raws["b.jpg"]], [(40, 40)] * 2)
    assert forced_only["matched"] == forced_only["of"] and d["matched"] < d["of"]
    assert d["unforced"]["matched"] < d["matched"]  # plainly, b would not have matched either
    assert "b.jpg" in _ties(d) and str(d["unforced"]["matched"]) in _ties(d)
    assert _ties({"selection": {"a.jpg": "same"}}) == ""
