from __future__ import annotations

import numpy as np
import pytest

from nailkit.data import samples as data


def test_synthetic_hand_is_deterministic_and_has_five_nails():
    a, ma = data.synthetic_hand(seed=3, size=(240, 320))
    b, mb = data.synthetic_hand(seed=3, size=(240, 320))
    c, _ = data.synthetic_hand(seed=4, size=(240, 320))
    assert a.shape == (240, 320, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and not np.array_equal(a, c)
    assert set(np.unique(ma)) == {0, 1, 2, 3, 4, 5}


def test_committed_samples_have_photos_synthetics_and_ground_truth():
    photos, synth = data.sample_images("photos"), data.sample_images("synthetic")
    assert len(photos) >= 2 and len(synth) >= 2
    assert all(data.ground_truth_mask(p) is None for p in photos)
    for p in synth:
        m = data.ground_truth_mask(p)
        assert m is not None and m.max() == 5


def test_make_data_regenerates_identical_synthetics(tmp_path):
    from PIL import Image

    data.make_data(tmp_path, n_synthetic=1)
    fresh = np.asarray(Image.open(tmp_path / "synthetic_hand_0.png"))
    committed = np.asarray(Image.open(data.DATA_DIR / "synthetic_hand_0.png"))
    assert np.array_equal(fresh, committed)
    assert (tmp_path / "photo_astronaut.jpg").exists()


def test_bad_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be"):
        data.sample_images("cats")
