"""The README.md of a mobile bundle, written from its model card (``nailkit.bundle.make_bundle`` builds the card):
``readme(card)`` for the CPU target's one .tflite, ``gpu_readme(card)`` for the GPU target's three graphs. Text only:
every number comes from the card."""

from __future__ import annotations

from typing import Any


def _ties(par: dict[str, Any]) -> str:
    """The parity line's note on images whose two-stage selection was a near-tie (``bundle.measure_parity``)."""
    ties = sorted(k for k, v in (par.get("selection") or {}).items() if v == "tie")
    if not ties:
        return ""
    un = par.get("unforced") or {}
    return (f"\n  On {', '.join(ties)} the two selections differ only between near-tied encoder scores, so those "
            f"images were compared with PyTorch re-run on the model's selection; compared plainly: "
            f"{un.get('matched')}/{un.get('of')} matched, min mask IoU {un.get('min_mask_iou')}.")


def readme(card: dict[str, Any]) -> str:
    inp = card["input"]
    lat = card["latency"]
    par = card["parity"]
    outs = "\n".join(f"| `{o['name']}` | {o['meaning']} | {o['shape']} {o['dtype']}"
                     f"{' (layout ' + o['layout'] + ')' if o.get('layout') else ''} | {o['description']}: "
                     f"{o['format']} | {o['values']} |" for o in card["outputs"])
    lat_lines = "\n".join(f"- {t} thread(s): median {v['median_ms']:.1f} ms, p90 {v['p90_ms']:.1f} ms"
                          for t, v in lat["by_threads"].items())
    steps = "\n".join(f"{i}. {s}" for i, s in enumerate(card["postprocess"]["steps"], 1))
    demo = ("\n> **Demo model**: this bundle was built from nailkit's random-weight demo checkpoint. Its scores sit "
            "near 0.03, so it finds no nails at the default threshold; it exists to test the integration.\n"
            if card["source"].get("demo_random_weights") else "")
    return f"""# Nail segmentation model bundle (RF-DETR {card['source']['architecture']}, TFLite)
{demo}
Everything the app needs is in this folder; `model_card.json` is the machine-readable version of this page.

| file | what |
|---|---|
| `{card['model_file']}` | the model ({card['source']['route']} route, {card['source']['precision']}) |
| `labels.txt` | class names, line *i* = class id *i* |
| `preprocess.py` | reference preprocessing (numpy + Pillow) |
| `postprocess.py` | reference post-processing (numpy only) |
| `io_contract.py` | reads the model's outputs by shape and meaning, (de)quantises, runs it (numpy, ai-edge-litert) |
| `run_bundle.py` | runs it all: `python run_bundle.py photo.jpg --json out.json` (numpy, Pillow, ai-edge-litert) |

## Input
`{inp['name']}`: {inp['dtype']} {inp['shape']} ({inp['layout']}), colour order {inp['colour_order']}.

{chr(10).join(f'{i}. {s}' for i, s in enumerate(inp['value_pipeline'], 1))}

mean = {inp['mean']}, std = {inp['std']}. Use the same resize as `preprocess.py` (a different resampler — e.g.
an antialiased one — shifts the scores).

## Outputs (identify them by **name or shape**, never by position: converters reorder them)
| name | meaning | shape | format | values |
|---|---|---|---|---|
{outs}

## Post-processing (in this order; `postprocess.py` is the reference)
{steps}

Defaults: num_select = {card['postprocess']['num_select']}, threshold = {card['postprocess']['threshold']},
mask threshold = {card['postprocess']['mask_threshold']} (on logits). {card['postprocess']['background_slot']}.

## Measured
- Parity vs PyTorch fp32 on {par['images']} images: {par['matched']}/{par['of']} of the top-10 detections matched by
  IoU; min mask IoU {par['min_mask_iou'] if par['min_mask_iou'] is None else round(par['min_mask_iou'], 4)};
  max box difference {par['max_box_l1_px']:.2f} px; max score difference {par['max_score_diff']:.2g}.{_ties(par)}
- Latency on {lat['cpu']} ({lat['cpu_count']} cores; load average {lat['loadavg_1m']:.1f} while measuring),
  XNNPACK, batch 1, {lat['runs']} runs:
{lat_lines}

Versions: see `model_card.json` → `versions`.
"""


def gpu_readme(card: dict[str, Any]) -> str:
    rows = "\n".join(f"| `{v['file']}` | " + ", ".join(f"`{i['name']}` {i['shape']}" for i in v["inputs"]) + " | "
                     + ", ".join(f"`{o['name']}`" for o in v["outputs"]) + f" | {v['ops']} |"
                     for v in card["graphs"].values())
    steps = "\n".join(f"{i}. {s}" for i, s in enumerate(card["postprocess"]["steps"], 1))
    meanings = "\n".join(f"- `{k}`: {v}" for k, v in card["io_meanings"].items())
    par = card["parity_cpu_interpreter"]
    gc = card["gpu_check"]
    gpu_line = gc if isinstance(gc, str) else (gc.get("skipped") or "; ".join(
        f"{m}: ops on GPU {gc[m].get('ops_on_gpu')}, parity {gc[m].get('parity', {}).get('matched_top10')} matched, "
        f"min mask IoU {gc[m].get('parity', {}).get('min_mask_iou')}" for m in ("gpu", "gpu_f32") if m in gc))
    inp = card["input"]
    return f"""# Nail segmentation model bundle — GPU target (RF-DETR {card['source']['architecture']}, LiteRT GPU delegate)

Three graphs for LiteRT's GPU delegate (every op on the GPU: no TopK/GATHER, no integer tensors, tensors ≤ 4-D),
with the two small host steps between them in numpy. `model_card.json` is the machine-readable version of this page;
each `.tflite` also carries its own metadata (`nailkit_metadata` entry and an appended zip with `nailkit_metadata.json`,
`labels.txt`).

| file | inputs | outputs | ops |
|---|---|---|---|
{rows}

`gpu_chain.py` runs the chain (`SplitModel(folder, "gpu")` compiles each graph for the GPU accelerator alone),
`postprocess.py` holds the host steps, `preprocess.py` the input pipeline, `run_bundle.py` all of it:
`python run_bundle.py photo.jpg [--accelerator gpu] --json out.json` (numpy, Pillow, ai-edge-litert).

## Input
`image`: float32 {inp['shape']} (NHWC), colour order RGB.
{chr(10).join(f'{i}. {s}' for i, s in enumerate(inp['value_pipeline'], 1))}

mean = {inp['mean']}, std = {inp['std']}.

## Tensors
{meanings}

## The chain (in this order)
{steps}

Defaults: num_queries = {card['num_queries']}, mask slots = {card['mask_slots']}, num_select =
{card['postprocess']['num_select']}, threshold = {card['postprocess']['threshold']}, mask threshold 0 (on logits).
Keep `memory` on the GPU between graphs when your runtime allows it (it is graph B's and graph C's input).

## Measured
- The chain on the CPU interpreter vs the one-graph PyTorch model, {par['images']} images: {par['matched_top10']}
  top-10 detections matched; min mask IoU {par['min_mask_iou']}; max score difference {par['max_score_diff']:.2g}.
- GPU delegate (LiteRT WebGPU accelerator): {gpu_line}
"""
