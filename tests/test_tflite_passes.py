"""nailkit.tflite.passes: the rank-2 × constant lift keeps every value and leaves no risky op; pack_model round-trips
(nailkit.tflite.flatbuffer)."""

from __future__ import annotations

import numpy as np
import pytest

from _probes import write_probe_model
from nailkit.gpu.op_check import op_check
from nailkit.tflite import passes as tflite_passes
from nailkit.tflite.flatbuffer import pack_model


@pytest.fixture()
def probe(tmp_path):
    return write_probe_model(tmp_path / "r2.tflite", "rank2_const")


def test_lift_keeps_values_and_clears_the_pattern(probe, tmp_path, cpu_run):
    x = np.random.default_rng(1).standard_normal((24, 32)).astype(np.float32)
    before = cpu_run(probe, x)
    assert len(tflite_passes.risky_constant_binary_ops(probe)) == 1
    out = tmp_path / "lifted.tflite"
    assert tflite_passes.lift_constant_binary_ops(probe, out) == 1
    assert tflite_passes.risky_constant_binary_ops(out) == []
    np.testing.assert_array_equal(cpu_run(out, x), before)
    assert op_check(out).histogram == {"RESHAPE": 2, "ADD": 1}
    assert tflite_passes.lift_constant_binary_ops(out) == 0  # idempotent: nothing left to lift


def test_clean_model_untouched(tmp_path):
    clean = write_probe_model(tmp_path / "clean.tflite", "clean")  # per-channel constant: not risky
    raw = clean.read_bytes()
    assert tflite_passes.risky_constant_binary_ops(clean) == []
    assert tflite_passes.lift_constant_binary_ops(clean) == 0 and clean.read_bytes() == raw


def test_pack_model_round_trip(probe, tmp_path, cpu_run):
    model = tflite_passes.load_model_t(probe)
    again = tmp_path / "again.tflite"
    again.write_bytes(pack_model(model))
    x = np.ones((24, 32), np.float32)
    np.testing.assert_array_equal(cpu_run(again, x), cpu_run(probe, x))


def test_not_a_flatbuffer_is_named(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"nope" * 10)
    with pytest.raises(ValueError, match="bad.tflite: not a TFLite flatbuffer"):
        tflite_passes.lift_constant_binary_ops(bad)
