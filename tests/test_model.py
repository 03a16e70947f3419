"""export_module options: masks only for the top-N queries (``mask_queries``), and the default graph unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nailkit.model.build import export_module, select_queries


def test_select_queries_is_a_stable_descending_topk():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 50, generator=g)
    scores[1, 10:20] = 0.5  # exact ties: broken by ascending index, like a stable argsort
    scores[2] = 1.0  # all tied
    sel = select_queries(scores, 12)
    assert sel.shape == (3, 12, 50) and sel.dtype == torch.float32
    assert torch.all(sel.sum(-1) == 1)  # one query per row
    assert torch.all(sel.sum(-2) <= 1)  # no query twice
    picked = sel.argmax(-1)
    expected = torch.argsort(-scores, dim=-1, stable=True)[:, :12]
    assert torch.equal(picked, expected)
    rows = torch.randn(3, 50, 5, generator=g)
    assert torch.equal(torch.matmul(sel, rows), torch.gather(rows, 1, expected[..., None].expand(-1, -1, 5)))


@pytest.fixture(scope="module")
def full_and_selected(demo_model):
    full = export_module(demo_model)
    sel = export_module(demo_model, mask_queries=20, return_query_indices=True)
    x = torch.randn(1, 3, full.resolution, full.resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return full, sel, [t.numpy() for t in full(x)], [t.numpy() for t in sel(x)], x


def test_default_export_module_is_unchanged(full_and_selected, demo_model):
    full, _, (boxes, logits, masks), _, _ = full_and_selected
    assert full.output_names == ("pred_boxes", "pred_logits", "pred_masks")
    assert full.mask_queries is None and full.sampling is None
    q = demo_model.model.model.num_queries
    assert boxes.shape == (1, q, 4) and logits.shape[:2] == (1, q) and masks.shape == (1, q, 108, 108)


def test_mask_queries_keep_the_top_n_rows_of_the_full_model(full_and_selected):
    _, sel, (fb, fl, fm), (b, l, m, idx), _ = full_and_selected
    assert sel.output_names == ("pred_boxes", "pred_logits", "pred_masks", "query_indices")
    assert b.shape == (1, 20, 4) and l.shape == (1, 20, fl.shape[-1]) and m.shape == (1, 20, 108, 108)
    assert idx.dtype == np.int32
    order = np.argsort(-fl[0].max(-1), kind="stable")[:20]
    assert np.array_equal(idx[0], order)
    # boxes and logits are the very same numbers; mask logits equal up to matmul blocking (20 vs 200 rows)
    assert np.array_equal(b[0], fb[0, order])
    assert np.array_equal(l[0], fl[0, order])
    assert np.abs(m[0] - fm[0, order]).max() <= 1e-4


def test_mask_queries_predictions_identical_to_full_model(full_and_selected):
    from nailkit.portable.postprocess import RawOutputs, postprocess

    _, _, (fb, fl, fm), (b, l, m, idx), _ = full_and_selected
    size = (640, 480)
    full = postprocess(RawOutputs(fb[0], fl[0], fm[0]), size, threshold=0.0, num_select=20)
    kept = postprocess(RawOutputs(b[0], l[0], m[0]), size, threshold=0.0, num_select=20)
    assert len(full) == len(kept) == 20
    assert np.array_equal(full.xyxy, kept.xyxy)
    assert np.array_equal(full.confidence, kept.confidence)
    assert np.array_equal(full.class_id, kept.class_id)
    assert np.array_equal(idx[0][kept.query_index], full.query_index)
    assert np.array_equal(full.mask, kept.mask)


def test_mask_queries_keeps_one_topk_for_selection_aware_parity(full_and_selected):
    from nailkit.verify.parity import run_torch_with_selection

    full, sel, _, _, x = full_and_selected
    res_full = run_torch_with_selection(full, x.numpy())
    res_sel = run_torch_with_selection(sel, x.numpy())  # raises unless exactly one torch.topk
    assert np.array_equal(res_full["topk_indices"], res_sel["topk_indices"])


def test_mask_queries_validation(demo_model):
    with pytest.raises(ValueError, match="between 1 and"):
        export_module(demo_model, mask_queries=0)
    with pytest.raises(ValueError, match="between 1 and"):
        export_module(demo_model, mask_queries=201)
    with pytest.raises(ValueError, match="segmentation"):
        export_module(demo_model, segmentation=False, mask_queries=10)
    with pytest.raises(ValueError, match="needs mask_queries"):
        export_module(demo_model, return_query_indices=True)
