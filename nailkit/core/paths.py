"""Where things are: the checkout, its notebooks, its outputs and the shipped demo model (one definition each)."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = PACKAGE_DIR.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
OUTPUT_DIR = REPO_ROOT / "outputs"
SHIPPED_MODELS = REPO_ROOT / "data" / "models"
#: the numpy-only files copied into every bundle (pre/postprocess, io_contract, the GPU chain, run_bundle)
PORTABLE_DIR = PACKAGE_DIR / "portable"
