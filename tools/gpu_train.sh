#!/usr/bin/env bash
# Train the demo nail model on a lent GPU machine (issue 17). Runs THERE, from the repo root, through the device
# tool's `run`; everything it returns is under $OUT. Helper: nailkit/train/gpu/ (python -m nailkit.train.gpu; its
# __init__.py docstring has the whole flow).
#
# Here, before (once):
#   .venv/bin/python -m nailkit.train.gpu wheels --download      # .gpu_wheels/ (ignored), Requires-Dist checked
#   .venv/bin/python -m nailkit.train.gpu untrack                # the 135.5 MB model out of the transfer
#   .venv/bin/python -m nailkit.train.gpu check-transfer         # <= 64 MiB with .gpu_wheels carried
# There (device tool; carry=[".gpu_wheels"]; ~10 of the 15 minutes in call 1, then quick calls within 30 s):
#   run: bash tools/gpu_train.sh train 7 32        # install, dataset, 7 min of training at batch 32, evaluate,
#                                                  # chunks 0-3 + manifest + logs back
#   run: bash tools/gpu_train.sh send 1            # chunks 4-7 (the machine is still warm: /tmp/nailkit-gpu)
#   run: bash tools/gpu_train.sh send 2            # chunk 8 (a 135.7 MB .pth is 9 chunks of 15 MiB)
# Here, after:
#   .venv/bin/python -m nailkit.train.gpu restore                # the model back in the index, exactly as it was
#   .venv/bin/python -m nailkit.train.gpu assemble <files_at of each call> --out /tmp/nails_seg_preview_gpu.pth
#   .venv/bin/python -m nailkit model-card /tmp/nails_seg_preview_gpu.pth --dataset DIR
#
# Optional environment: NAILKIT_GPU_INIT=path.pth (start from weights that travel; the committed model does not),
# NAILKIT_GPU_WARMUP="288 200" (resolution and steps of a low-resolution warm-up).
set -euo pipefail

STATE=${NAILKIT_GPU_STATE:-/tmp/nailkit-gpu}
WHEELS=${NAILKIT_WHEELS:-.gpu_wheels}
PY=${PYTHON:-python3}
OUT=${OUT:?the device tool sets \$OUT}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NAILKIT_CACHE="$STATE/cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$STATE"

mode=${1:?usage: gpu_train.sh train [MINUTES] [BATCH] | send K}
case "$mode" in
  train)
    minutes=${2:-7}
    batch=${3:-32}
    {
      echo "== $(date -u +%FT%TZ) setup"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
      "$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, torch.cuda.is_available())'
      "$PY" -m nailkit.train.gpu install-wheels "$WHEELS"
      # fail in seconds, not after the dataset, if an import is missing
      "$PY" -c 'import rfdetr, rfdetr.training, pycocotools, faster_coco_eval, supervision, skimage; print("imports ok", rfdetr.__version__)'
    } > "$STATE/setup.log" 2>&1 || { tail -n 60 "$STATE/setup.log"; cp "$STATE/setup.log" "$OUT/"; exit 1; }
    tail -n 20 "$STATE/setup.log"
    extra=()
    [ -n "${NAILKIT_GPU_INIT:-}" ] && extra+=(--init-from "$NAILKIT_GPU_INIT")
    if [ -n "${NAILKIT_GPU_WARMUP:-}" ]; then
      read -r wres wsteps <<< "$NAILKIT_GPU_WARMUP"; extra+=(--warmup-resolution "$wres" --warmup-steps "$wsteps")
    fi
    set +e
    "$PY" -m nailkit.train.gpu machine-train --state "$STATE" --minutes "$minutes" --batch-size "$batch" \
      "${extra[@]}" > "$STATE/train.log" 2>&1
    rc=$?
    set -e
    tail -c 200000 "$STATE/train.log" | tr '\r' '\n' | grep -v '^\s*$' | tail -n 400 > "$STATE/train_tail.log" || true
    tail -n 40 "$STATE/train_tail.log"
    if [ $rc -ne 0 ]; then cp "$STATE/train_tail.log" "$STATE/setup.log" "$OUT/"; exit $rc; fi
    "$PY" -m nailkit.train.gpu stage --state "$STATE" --out "$OUT" --call 0 \
      --extra "$STATE/eval.json" "$STATE/train_tail.log"
    ;;
  send)
    "$PY" -m nailkit.train.gpu stage --state "$STATE" --out "$OUT" --call "${2:?send K}"
    ;;
  *)
    echo "usage: gpu_train.sh train [MINUTES] [BATCH] | send K" >&2; exit 2 ;;
esac
ls -la "$OUT"
