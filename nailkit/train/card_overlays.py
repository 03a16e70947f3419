"""The model card's picture: what notebook 05 shows at the operating threshold, as one PNG beside the checkpoint —
three test images of the dataset the card scores, the three synthetic images and the three nail-free photos in
``data/`` — each with the PyTorch model's boxes, masks and scores above the threshold (``nailkit.report.viz``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from nailkit.data.coco_export import load_split
from nailkit.data.samples import sample_images

#: Rows of the picture: (title, images).
Rows = Sequence[tuple[str, Sequence[Path]]]


def card_image_rows(dataset: str | os.PathLike[str], *, split: str = "test", n: int = 3) -> list[tuple[str, list[Path]]]:
    """The first ``n`` images of ``dataset/<split>`` that hold nails, then ``data/``'s synthetic images and photos."""
    data = load_split(dataset, split)
    with_nails = {a["image_id"] for a in data.coco.get("annotations", [])}
    test = [data.image_path(im) for im in data.coco["images"] if im["id"] in with_nails][:n]
    return [(f"{Path(dataset).name} / {split}", test),
            ("data/ synthetic", list(sample_images("synthetic"))[:n]),
            ("data/ photos (no nail)", list(sample_images("photos"))[:n])]


def write_card_overlays(runner: Any, rows: Rows, path: str | os.PathLike[str], *, threshold: float = 0.5,
                        panel: float = 3.2) -> list[dict[str, Any]]:
    """Draw ``rows`` (``card_image_rows``) with ``runner``'s detections above ``threshold`` into ``path`` (PNG).
    Returns one ``{"image", "detections", "scores"}`` per panel, for the card's record."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from nailkit.report.viz import overlay

    cols = max((len(images) for _, images in rows), default=1)
    fig, axes = plt.subplots(len(rows), cols, figsize=(panel * cols, panel * 0.8 * len(rows)), squeeze=False)
    found = []
    for r, (title, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(images):
                continue
            pred = runner.predict(images[c], threshold=threshold)
            ax.imshow(overlay(images[c], pred))
            ax.set_title(f"{title}: {Path(images[c]).name}\n{len(pred)} at score > {threshold}", fontsize=8)
            found.append({"image": f"{title}/{Path(images[c]).name}", "detections": len(pred),
                          "scores": [round(float(s), 3) for s in pred.confidence]})
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return found
