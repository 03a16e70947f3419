"""``python -m nailkit ...``: every pipeline stage from the command line.

Each subcommand's handler lives in the module of its stage (``cli_<name>(args) -> int``). Bad input exits non-zero
with a one-line error, never a traceback (set NAILKIT_DEBUG=1 to see it).
"""

from __future__ import annotations

import argparse
from pathlib import Path
import json
import os
import sys

from nailkit.accuracy.evaluate import cli_evaluate
from nailkit.bench.benchmark import cli_bench
from nailkit.bundle import cli_bundle
from nailkit.core import offline
from nailkit.core.errors import NailkitError
from nailkit.core.notebooks import cli_strip, cli_workbook
from nailkit.core.outdir import check_path, guard_output
from nailkit.core.paths import SHIPPED_MODELS
from nailkit.core.validate import validate_args
from nailkit.data.coco_export import DatasetError, load_split
from nailkit.data.samples import DATA_DIR, make_data
from nailkit.data.synthetic_dataset import make_dataset
from nailkit.export.onnx import cli_export_onnx
from nailkit.model.build import make_demo_checkpoint
from nailkit.model.checkpoint_report import inspect_checkpoint
from nailkit.runtime.predict import cli_predict
from nailkit.tflite.convert import cli_convert as convert_cpu
from nailkit.train.card import cli_model_card as write_model_card
from nailkit.train.demo import cli_train_demo


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _strs(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_model_and_data_commands(sub) -> None:
    """Subcommands: inspection, sample data, the labelled dataset, training and scoring."""
    s = sub.add_parser("inspect", help="what a checkpoint holds (architecture from shapes, cross-checked with args)")
    s.add_argument("checkpoint")
    s.add_argument("--json", action="store_true", help="print a JSON object")
    s.add_argument("--trusted", action="store_true", help="allow unpickling arbitrary objects (only for files you trust)")
    s.set_defaults(handler=cli_inspect)

    s = sub.add_parser("demo-checkpoint", help="write the deterministic random-weight demo checkpoint")
    s.add_argument("out")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(handler=cli_demo_checkpoint)

    s = sub.add_parser("make-data", help="(re)generate the sample images in data/")
    s.add_argument("--out", default=None)
    s.set_defaults(handler=cli_make_data)

    s = sub.add_parser("make-dataset", help="write the labelled synthetic nail dataset (Roboflow COCO layout)")
    s.add_argument("out")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train", type=int, default=None, help="images in train/ (default 400)")
    s.add_argument("--valid", type=int, default=None, help="images in valid/ (default 40)")
    s.add_argument("--test", type=int, default=None, help="images in test/ (default 60)")
    s.add_argument("--force", action="store_true", help="write into a non-empty folder nailkit did not make")
    s.set_defaults(handler=cli_make_dataset)

    s = sub.add_parser("train-demo", help="train the seed's architecture on a dataset with rfdetr's own trainer")
    s.add_argument("--dataset", required=False, help="Roboflow-layout COCO folder (train/ valid/)")
    s.add_argument("--out", required=True, help="where the trained .pth goes")
    s.add_argument("--minutes", type=float, default=60.0, help="time box for this run")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--resume", default=None, help="last.ckpt (or its folder) of an earlier run")
    s.add_argument("--epochs", type=int, default=200, help="schedule length (the time box usually stops first)")
    s.add_argument("--batches-per-epoch", type=int, default=60, help="short epochs: checkpoint + validation each")
    s.add_argument("--batch-size", type=int, default=2)
    s.add_argument("--grad-accum-steps", type=int, default=1)
    s.add_argument("--lr", type=float, default=2e-4)
    s.add_argument("--work-dir", default=None, help="resumable state (default ~/.cache/nailkit/train-demo)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--package-only", action="store_true",
                   help="no training: write --out from the work folder's best weights (e.g. after a stopped run)")
    s.add_argument("--layer-decay", type=float, default=1.0,
                   help="rfdetr's lr_vit_layer_decay (ViT block i trains at decay^(13-i) of the encoder lr); "
                        "rfdetr's 0.8 assumes a pretrained DINOv2, 1.0 (default) suits random init")
    s.add_argument("--component-decay", type=float, default=1.0,
                   help="rfdetr's lr_component_decay (decoder lr factor; rfdetr's default 0.7, here 1.0)")
    s.add_argument("--lr-warmup-steps", type=int, default=None,
                   help="rfdetr's linear lr warm-up, in optimizer steps (default 0; 40 with --init-from)")
    s.add_argument("--warmup-resolution", type=int, default=None,
                   help="train the first --warmup-steps optimizer steps at this resolution (multiple of 24, e.g. 288)")
    s.add_argument("--warmup-steps", type=int, default=0, help="optimizer steps at --warmup-resolution")
    s.add_argument("--init-from", default=None,
                   help="start from this .pth's model weights (e.g. data/models/nails_seg_preview_v5.pth) with a fresh "
                        "optimizer and a short lr warm-up (loaded weights-only)")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 mixed precision on a CPU with native bf16 (AVX512-BF16/AMX; weights stay fp32), "
                        "else fp32 on the CPU and rfdetr's choice on a GPU")
    s.add_argument("--lr-drop", type=int, default=None,
                   help="epochs (of --batches-per-epoch steps) after which the lr drops 10x (rfdetr's step schedule; "
                        "its default 100 is never reached in a time box): end a time-boxed run on a low lr")
    s.add_argument("--checkpoint-interval", type=int, default=10,
                   help="keep an archive checkpoint_<epoch>.ckpt every N epochs (last.ckpt is rewritten every epoch)")
    s.add_argument("--trusted", action="store_true",
                   help="allow unpickling --resume / work-folder files outside nailkit's allow-list (only files you "
                        "trust: unpickling can run code)")
    s.set_defaults(handler=cli_train_demo)

    s = sub.add_parser("evaluate", help="box/mask mAP (pycocotools) of a .pth/.onnx/.tflite on a COCO split")
    s.add_argument("model")
    s.add_argument("--dataset", required=True, help="a Roboflow COCO export (train/ valid/ test/)")
    s.add_argument("--split", default="test")
    s.add_argument("--backend", default=None, help="torch, torch-traced, onnxruntime, tflite (default: by file)")
    s.add_argument("--resolution", type=int, default=None)
    s.add_argument("--threshold", type=float, default=0.5, help="operating threshold for recall / FP per image")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--max-images", type=int, default=None)
    s.add_argument("--rows", default=None, help="write metrics + per-image rows to this JSON file")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--trusted", action="store_true")
    s.set_defaults(handler=cli_evaluate)

    s = sub.add_parser("model-card", help="score a checkpoint and write its model card (.card.json + .md) beside it")
    s.add_argument("checkpoint")
    s.add_argument("--dataset", required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--unseen-dataset", default=None,
                   help="a second dataset from a seed training never saw (make-dataset --seed 7): the bar is checked "
                        "on its split too")
    s.add_argument("--work-dir", default=None,
                   help="the train-demo folder these weights came from (its last.ckpt): the card's resume command "
                        "names it")
    s.add_argument("--force", action="store_true", help="replace the shipped card in data/models/")
    s.set_defaults(handler=cli_model_card)


def _add_conversion_commands(sub) -> None:
    """Subcommands: checkpoint → ONNX → TFLite."""
    s = sub.add_parser("export-onnx", help="checkpoint → verified ONNX")
    s.add_argument("checkpoint")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--resolution", type=int, default=None)
    s.add_argument("--opset", type=int, default=None, help="default 17 (legacy) / 18 (dynamo)")
    s.add_argument("--exporter", choices=["legacy", "dynamo"], default="legacy")
    s.add_argument("--simplify", action="store_true", help="run onnxslim on the exported graph")
    s.add_argument("--sampling", choices=["grid", "tent", "xnn"], default="grid",
                   help="deformable-attention sampling: grid (rfdetr's grid_sample), tent (gather-free matmul) or xnn "
                        "(tent + query selection and sine embedding rewritten to stay on XNNPACK)")
    s.add_argument("--mask-queries", type=int, default=None, metavar="N",
                   help="masks only for the N best queries, selected in-graph (default: all)")
    s.add_argument("--trusted", action="store_true")
    s.add_argument("--force", action="store_true",
                   help="write into a non-empty --out that nailkit did not make (nothing there is deleted)")
    s.set_defaults(handler=cli_export_onnx)

    s = sub.add_parser("convert", help="checkpoint → ONNX → TFLite (published only after its gate passed)")
    s.add_argument("checkpoint", help="rfdetr .pth ('' = the demo checkpoint)")
    s.add_argument("--out", required=True, help="output directory (the artifact cache lives under it)")
    s.add_argument("--route", choices=["onnx2tf", "litert"], default=None,
                   help="litert (default: litert-torch, the fastest measured path) or onnx2tf (route A, the seed's)")
    s.add_argument("--precision", type=_strs, default=None,
                   help="comma list of fp32, fp16, int8 (and full_int8 on route onnx2tf; w8a8, w8a16 — static "
                        "selective int8 — on route litert: reported, not gated). Default: fp32, plus int8 on a CPU "
                        "with int8 dot-product instructions (VNNI, AMX, dotprod), where int8 is faster")
    s.add_argument("--calibration", type=int, default=8, metavar="N",
                   help="w8a8/w8a16: calibrate on N train-split images (default 8)")
    s.add_argument("--calibration-dir", default=None,
                   help="w8a8/w8a16: a COCO split folder to calibrate on (default: the synthetic train split)")
    s.add_argument("--resolution", type=int, default=None, help="default: the checkpoint's")
    s.add_argument("--sampling", choices=["grid", "tent", "xnn"], default=None,
                   help="deformable-attention sampling: grid (rfdetr's grid_sample), tent (gather-free matmul) or xnn "
                        "(tent + query selection and sine embedding rewritten to stay on XNNPACK). Default: xnn on "
                        "route litert, grid on route onnx2tf")
    s.add_argument("--mask-queries", type=int, default=None, metavar="N",
                   help="masks only for the N best queries, selected in-graph (default: all)")
    s.add_argument("--force", action="store_true",
                   help="convert again even when cached, or when a refusal of the same conversion is recorded; "
                        "also: write into a non-empty --out that nailkit did not make (nothing there is deleted)")
    s.add_argument("--trusted", action="store_true", help="allow unpickling arbitrary objects (only files you trust)")
    s.add_argument("--target", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: the .tflite files of --route/--precision (default); gpu: the GPU target's three graphs "
                        "(nailkit.gpu.convert; --route/--precision/--sampling do not apply)")
    s.set_defaults(handler=cli_convert)


def _add_use_commands(sub) -> None:
    """Subcommands: running, bundling and benchmarking the converted files, and the notebooks."""
    s = sub.add_parser("predict", help="run a .pth/.onnx/.tflite on images; write overlays + detections JSON")
    s.add_argument("model")
    s.add_argument("images", nargs="+")
    s.add_argument("--backend", default=None, help="torch, torch-traced, onnxruntime, tflite (default: by file)")
    s.add_argument("--threshold", type=float, default=0.5)
    s.add_argument("--mask-threshold", type=float, default=0.0)
    s.add_argument("--num-select", type=int, default=None)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--out", default="outputs/predict")
    s.add_argument("--trusted", action="store_true")
    s.add_argument("--force", action="store_true",
                   help="write into a non-empty --out that nailkit did not make (nothing there is deleted)")
    s.set_defaults(handler=cli_predict)

    s = sub.add_parser("bundle", help="self-contained mobile bundle: .tflite + model card + numpy post-processing")
    s.add_argument("checkpoint")
    s.add_argument("--out", required=True)
    s.add_argument("--route", choices=["onnx2tf", "litert"], default=None,
                   help="litert (default: the fastest measured path) or onnx2tf (route A)")
    s.add_argument("--precision", default="fp32")
    s.add_argument("--sampling", choices=["grid", "tent", "xnn"], default=None,
                   help="deformable-attention sampling (default: xnn on route litert, grid on route onnx2tf)")
    s.add_argument("--resolution", type=int, default=None)
    s.add_argument("--tflite", default=None, help="reuse an existing converted .tflite instead of converting")
    s.add_argument("--target", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: one .tflite for XNNPACK (default); gpu: three graphs for LiteRT's GPU delegate + numpy "
                        "host steps (nailkit.gpu.split)")
    s.add_argument("--gpu-check", action="store_true",
                   help="--target gpu: also run the graphs under LiteRT's GPU accelerator (SwiftShader here) and "
                        "write its verdict and parity into the model card")
    s.add_argument("--trusted", action="store_true")
    s.add_argument("--force", action="store_true",
                   help="write into a non-empty --out that nailkit did not make (its other files are kept)")
    s.set_defaults(handler=cli_bundle)

    s = sub.add_parser("bench", help="benchmark every backend side by side")
    s.add_argument("checkpoint", nargs="?", default="")
    s.add_argument("--artifacts", default="outputs")
    s.add_argument("--runs", type=int, default=10)
    s.add_argument("--threads", type=_ints, default=[1, 2, 4])
    s.add_argument("--out", default="outputs")
    s.set_defaults(handler=cli_bench)

    s = sub.add_parser("workbook", help="execute every notebook with papermill (outputs/executed/)")
    s.add_argument("--only", type=_strs, default=None, help="notebook stems or numbers, e.g. 01,03")
    s.add_argument("--checkpoint", default="")
    s.add_argument("--quick", action="store_true", help="trimmed parameters, as the test suite uses")
    s.set_defaults(handler=cli_workbook)

    s = sub.add_parser("strip-notebooks", help="remove outputs/execution counts from notebooks in place")
    s.add_argument("paths", nargs="*", default=["notebooks"])
    s.set_defaults(handler=cli_strip)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nailkit", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    _add_model_and_data_commands(sub)
    _add_conversion_commands(sub)
    _add_use_commands(sub)
    return p


def cli_inspect(args: argparse.Namespace) -> int:
    report = inspect_checkpoint(args.checkpoint, trusted=args.trusted)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print(report.render())
    return 0


def cli_demo_checkpoint(args: argparse.Namespace) -> int:
    print(make_demo_checkpoint(args.out, seed=args.seed))
    return 0


def cli_make_data(args: argparse.Namespace) -> int:
    for p in make_data(args.out or DATA_DIR):
        print(p)
    return 0


def cli_make_dataset(args: argparse.Namespace) -> int:
    sizes = {k: v for k in ("train", "valid", "test") if (v := getattr(args, k)) is not None}
    print(json.dumps(make_dataset(args.out, seed=args.seed, sizes=sizes, progress=True), indent=2))
    return 0


def cli_model_card(args: argparse.Namespace) -> int:
    """``model-card``: the dataset split is checked (valid COCO, not empty) before the checkpoint loads, and the
    shipped card (data/models/) is replaced only with --force."""
    ckpt = check_path(args.checkpoint, "checkpoint", kind="file")
    if not ckpt.is_file():
        raise NailkitError(f"{ckpt}: no such checkpoint; expected an rfdetr .pth")
    for ds in [args.dataset] + ([args.unseen_dataset] if getattr(args, "unseen_dataset", None) else []):
        split = load_split(ds, args.split)
        if not split.coco["images"]:
            raise DatasetError(f"{split.annotation_file}: the {args.split!r} split has no images; a model card needs "
                               f"a non-empty split")
    work = getattr(args, "work_dir", None)
    if work and not (Path(work) / "last.ckpt").is_file():
        raise NailkitError(f"--work-dir {work}: no last.ckpt there; expected the train-demo work folder whose full "
                           f"state the card's resume command continues")
    card = ckpt.with_suffix(".card.json")
    shipped = SHIPPED_MODELS
    if card.exists() and ckpt.resolve().parent == shipped and not args.force:
        raise NailkitError(f"{card}: is the shipped model card; pass --force to replace it (or copy the checkpoint "
                           f"elsewhere first)")

    return write_model_card(args)


def cli_convert(args: argparse.Namespace) -> int:
    """``convert``: the CPU target's files (nailkit.tflite.convert) or the GPU target's graphs (nailkit.gpu.convert)."""
    if getattr(args, "target", "cpu") == "gpu":
        from nailkit.gpu.convert import cli_convert_gpu  # lazy: torch + rfdetr at import

        return cli_convert_gpu(args)

    return convert_cpu(args)


def main(argv: list[str] | None = None) -> int:
    offline.activate()  # this process and every child it starts stay offline (NAILKIT_OFFLINE=0 to allow)
    args = build_parser().parse_args(argv)
    user_errors: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError, KeyError, TypeError)
    try:
        from google.protobuf.message import DecodeError  # a corrupt .onnx / SavedModel

        user_errors += (DecodeError,)
    except ImportError:  # pragma: no cover - protobuf is a dependency
        pass

    user_errors = (NailkitError,) + user_errors
    try:
        validate_args(args)  # every flag's range, before anything loads
        handler = args.handler
        flag_attr = OUTPUT_FOLDERS.get(args.command)
        if flag_attr is None:
            return int(handler(args) or 0)

        flag, attr = flag_attr
        # refuse a folder nailkit did not write (unless --force); on failure remove the empty folders this run made
        with guard_output(getattr(args, attr), args.command, flag=flag, force=bool(getattr(args, "force", False))):
            return int(handler(args) or 0)
    except user_errors as exc:
        if os.environ.get("NAILKIT_DEBUG"):
            raise
        text = str(exc).strip()
        msg = text.splitlines()[0] if text else ""
        if isinstance(exc, KeyError) or not msg or not isinstance(exc, (ValueError, OSError, RuntimeError)):
            msg = f"{type(exc).__name__}: {msg or 'no message'}"  # say what kind of surprise it was
        print(f"nailkit {args.command}: error: {msg} (NAILKIT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


# subcommand → (flag, attribute) of the output folder that nailkit.core.outdir.guard_output checks and marks
OUTPUT_FOLDERS = {"bundle": ("--out", "out"), "convert": ("--out", "out"), "export-onnx": ("--out", "out"),
                  "predict": ("--out", "out"), "make-dataset": ("out", "out")}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
