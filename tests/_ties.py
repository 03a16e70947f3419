"""Test-only: compare two detection lists from different implementations (numpy vs torch, two ONNX graphs) the way
the parity gates do. Detections whose scores are within ``gates.TIE_EPS`` of each other are a near-tie, and another
implementation's summation order (another ISA, another kernel) may rank them the other way; everything else must
stand in the same order."""

from __future__ import annotations

import numpy as np

from nailkit.verify.gates import TIE_EPS


def tie_order(conf_a, cls_a, xyxy_a, conf_b, cls_b, xyxy_b, tie_eps: float = TIE_EPS) -> np.ndarray:
    """The order of b's detections that lines them up with a's: b[order[i]] is a[i]'s counterpart, the entry of b of
    the same class whose score is within ``tie_eps`` of a[i]'s (the nearest box among those). The identity when no
    near-tie was re-ranked; AssertionError naming the detection when a's i-th has no counterpart."""
    conf_a, conf_b = np.asarray(conf_a, np.float64), np.asarray(conf_b, np.float64)
    cls_a, cls_b = np.asarray(cls_a), np.asarray(cls_b)
    xyxy_a, xyxy_b = np.asarray(xyxy_a, np.float64), np.asarray(xyxy_b, np.float64)
    assert len(conf_a) == len(conf_b), f"{len(conf_a)} vs {len(conf_b)} detections"
    free = list(range(len(conf_b)))
    order = []
    for i in range(len(conf_a)):
        # a counterpart of the same class and score, standing among b's detections tied with b's i-th (a re-ranked
        # near-tie), not anywhere in the list
        cands = [j for j in free if cls_b[j] == cls_a[i] and abs(conf_b[j] - conf_a[i]) <= tie_eps
                 and abs(conf_b[j] - conf_b[i]) <= tie_eps]
        assert cands, (f"detection {i} (class {cls_a[i]}, score {conf_a[i]:.6f}) has no counterpart of the same class "
                       f"within a near-tie ({tie_eps}) of its score")
        j = cands[0] if cands[0] == i else min(cands, key=lambda j: np.abs(xyxy_b[j] - xyxy_a[i]).max())
        free.remove(j)
        order.append(j)
    return np.asarray(order, dtype=np.int64)

