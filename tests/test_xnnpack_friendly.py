"""The XNNPACK-friendly two-stage selection and sine embedding (``sampling="xnn"``) compute the same numbers as
rfdetr's own code: one-hot matmul gathers, constant proposals, constant ``dim_t`` without slicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rfdetr.models.transformer import gen_sineembed_for_position

from nailkit.model import xnnpack_friendly as X


def test_onehot_rows_pick_rows_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1296, 7, generator=g) * 1e3
    idx = torch.randint(0, 1296, (2, 200), generator=g)
    oh = X.onehot_rows(idx, 1296)
    assert oh.shape == (2, 200, 1296) and set(oh.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(oh.sum(-1), torch.ones(2, 200))
    assert torch.equal(torch.matmul(oh, x), torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, 7)))


@pytest.mark.parametrize("components", [2, 4])
def test_sine_embedding_is_rfdetrs(components):
    g = torch.Generator().manual_seed(components)
    pos = torch.rand(1, 200, components, generator=g) * 1.4 - 0.2
    dim = 128
    ch = torch.arange(dim)
    ours = X.sine_embedding(pos, X.sine_dim_t(dim), (ch % 2 == 0).float(), (ch % 2 == 1).float())
    assert torch.equal(ours, gen_sineembed_for_position(pos, dim))


def test_xnn_module_equals_tent_module_bitwise(demo_model):
    from nailkit.data.samples import sample_images
    from nailkit.model.build import export_module, normalize_sampling
    from nailkit.verify.parity import selection_module, topk_probe
    from nailkit.portable.preprocess import preprocess

    tent = selection_module(export_module(demo_model, sampling="tent"))
    xnn = selection_module(export_module(demo_model, sampling="xnn"))
    assert X.is_xnnpack_friendly(xnn.inner.inner) and not X.is_xnnpack_friendly(tent.inner.inner)
    assert normalize_sampling("xnn") == "xnn"
    x = torch.as_tensor(preprocess(sample_images()[0], tent.resolution)[0])
    with torch.no_grad():
        a, b = tent(x), xnn(x)
    assert len(a) == len(b) == 5
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    # a forced selection (the selection-aware parity's re-run) reaches the one-hot gathers too
    forced = (np.arange(200) * 5)[None]
    with torch.no_grad(), topk_probe(forced):
        a = tent.inner(x)
    with torch.no_grad(), topk_probe(forced):
        b = xnn.inner(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # nothing leaks: rfdetr's functions and torch's are restored after the forward
    import rfdetr.models.transformer as T

    assert T.gen_sineembed_for_position is gen_sineembed_for_position and torch.gather.__module__ != X.__name__


def test_refuses_a_transformer_it_does_not_know():
    class Net(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="two-stage"):
        X.make_xnnpack_friendly(Net(), 432)


def test_repeat_as_concat_is_repeat():
    x = torch.randn(1, 1, 5)
    orig = torch.Tensor.repeat
    with X._repeat_as_concat():
        assert torch.Tensor.repeat is not orig
        a = x.repeat(4, 1, 1)
        y = torch.randn(2, 3)
        b = y.repeat(2, 3)
    assert torch.equal(a, x.repeat(4, 1, 1)) and torch.equal(b, y.repeat(2, 3))
    assert torch.Tensor.repeat is orig  # restored
