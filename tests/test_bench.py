"""nailkit.bench: the harness is tested with cheap fake callables and a fake clock — never with real timings.
(The XNNPACK GEMM probe itself: tests/test_ceilings.py.)"""

from __future__ import annotations

import math

import pytest

from nailkit.bench import backends, ceilings, discovery, flops, targets
from nailkit.bench.backends import BackendSpec
from nailkit.bench.benchmark import BenchResult, valid_numbers
from nailkit.bench.timing import interleaved_latency, LatencyStats, percentile, ratios, rotated_order
from nailkit.report import bench_report
from nailkit.report.tables import table


class FakeClock:
    """Advances only when a fake backend 'runs', by that backend's fixed cost."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make_fns(clock: FakeClock, costs: dict[str, float], calls: list[str]):
    def make(name, cost):
        def fn():
            calls.append(name)
            clock.t += cost
        return fn
    return {n: make(n, c) for n, c in costs.items()}


def test_rotated_order_every_backend_leads_once_per_cycle():
    names = ["a", "b", "c"]
    orders = [rotated_order(names, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert {o[0] for o in orders} == set(names)
    assert rotated_order(names, 4) == ["b", "c", "a"]


def test_interleaved_latency_medians_and_rotation():
    clock = FakeClock()
    calls: list[str] = []
    fns = make_fns(clock, {"slow": 0.100, "fast": 0.010, "mid": 0.050}, calls)
    log: list[list[str]] = []
    stats = interleaved_latency(fns, runs=4, warmup=1, clock=clock, order_log=log)
    assert stats["slow"].median_ms == pytest.approx(100.0)
    assert stats["fast"].median_ms == pytest.approx(10.0)
    assert stats["mid"].p90_ms == pytest.approx(50.0)
    assert all(s.n == 4 for s in stats.values())
    # warm-up (1 round) + 4 timed rounds, each runs every backend exactly once
    assert len(calls) == 15
    assert log == [rotated_order(["slow", "fast", "mid"], r) for r in range(4)]
    assert log[0] != log[1]  # the order really rotates


def test_interleaving_spreads_noise_over_all_backends():
    """A noise burst during one round hits every backend in that round, not only the one that happened to run."""
    clock = FakeClock()
    rounds = {"n": 0}
    per_round = 2

    def make(name):
        def fn():
            rounds["n"] += 1
            r = (rounds["n"] - 1) // per_round
            clock.t += 0.010 + (0.5 if r == 2 else 0.0)  # the 3rd round is noisy for everyone
        return fn

    stats = interleaved_latency({"a": make("a"), "b": make("b")}, runs=5, warmup=0, clock=clock)
    assert max(stats["a"].samples_ms) == pytest.approx(510.0)
    assert max(stats["b"].samples_ms) == pytest.approx(510.0)
    assert stats["a"].median_ms == pytest.approx(stats["b"].median_ms)


def test_percentile_linear_interpolation():
    s = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(s, 50) == 3.0
    assert percentile(s, 90) == pytest.approx(4.0 + 0.6 * 6.0)
    st = LatencyStats("x", s)
    assert st.p90_ms >= st.median_ms >= st.min_ms
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile(s, 101)


def test_ratios_to_reference():
    r = ratios({"ort": 200.0, "tfl": 100.0, "pt": 400.0}, "ort")
    assert r == {"ort": 1.0, "tfl": 0.5, "pt": 2.0}
    with pytest.raises(KeyError, match="not among"):
        ratios({"a": 1.0}, "ort")
    with pytest.raises(ValueError):
        ratios({"ort": 0.0}, "ort")


@pytest.mark.parametrize("kwargs, exc", [
    ({"runs": 0}, ValueError), ({"runs": 2.5}, ValueError), ({"warmup": -1}, ValueError),
])
def test_invalid_arguments_rejected(kwargs, exc):
    with pytest.raises(exc):
        interleaved_latency({"a": lambda: None}, **kwargs)


def test_empty_and_non_callable_rejected():
    with pytest.raises(ValueError, match="no backends"):
        interleaved_latency({})
    with pytest.raises(TypeError, match="not callable"):
        interleaved_latency({"a": 3})


def test_failing_backend_is_named():
    def boom():
        raise ValueError("bad input")

    with pytest.raises(RuntimeError, match="'broken'.*bad input"):
        interleaved_latency({"ok": lambda: None, "broken": boom}, runs=1, warmup=0)


def test_latency_stats_rejects_invalid_samples():
    with pytest.raises(ValueError):
        LatencyStats("x", [])
    with pytest.raises(ValueError):
        LatencyStats("x", [1.0, float("nan")])
    with pytest.raises(ValueError):
        LatencyStats("x", [-1.0])


def test_achieved_fraction():
    # 10 GFLOP in 100 ms = 100 GFLOP/s; against a 400 GFLOP/s ceiling = 25 %
    assert flops.achieved_fraction(10e9, 100.0, 400.0) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        flops.achieved_fraction(1e9, 0.0, 1.0)


def test_count_flops_counts_linear_and_lists_uncounted_ops():
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, 5)

        def forward(self, x):
            y = self.conv(x).relu().mean(dim=(2, 3))
            return (torch.nn.functional.gelu(self.fc(y)),)

    fc = flops.count_flops(Tiny(), 8)
    conv = 2 * 4 * 3 * 3 * 3 * 8 * 8  # 2·Cout·Cin·k·k·H·W
    lin = 2 * 4 * 5
    assert fc.flops == conv + lin
    assert fc.macs == fc.flops // 2
    assert "gelu" in fc.uncounted_ops and "relu" in fc.uncounted_ops
    assert "convolution" in fc.by_op and "addmm" in fc.by_op


def test_backend_spec_validation():
    with pytest.raises(ValueError, match="unknown kind"):
        BackendSpec("x", "caffe", "m", 432)
    with pytest.raises(ValueError, match="resolution"):
        BackendSpec("x", "torch", "m", 0)


def _fake_result():
    specs = {"onnxruntime fp32": BackendSpec("onnxruntime fp32", "onnxruntime", "a.onnx", 432),
             "pytorch eager": BackendSpec("pytorch eager", "torch", "c.pth", 432),
             "tflite": BackendSpec("tflite", "tflite", "b.tflite", 336, meta={"precision": "int8"})}
    lat = {1: {"onnxruntime fp32": LatencyStats("o", [300.0, 320.0]).summary(),
               "pytorch eager": LatencyStats("p", [600.0]).summary(),
               "tflite": LatencyStats("t", [150.0]).summary()}}
    counts = {432: {"gflops": 86.0, "gmacs": 43.0, "uncounted_ops": {"gelu": 17}},
             336: {"gflops": 50.0, "gmacs": 25.0, "uncounted_ops": {}}}
    return BenchResult(machine={"cpu": "Fake CPU", "cpu_count": 2}, specs=specs, latency=lat, flops=counts,
                       drift={"tflite": {"matched_top10": "28/30", "min_mask_iou": 0.9, "max_logit_abs": 0.1}},
                       ceilings={1: {"fp32": 100.0, "dynamic_int8": 200.0, "int8": 400.0}})


def test_rows_ratios_and_markdown():
    res = _fake_result()
    rows = {r["backend"]: r for r in res.rows(1)}
    assert rows["onnxruntime fp32"]["x_ort_fp32"] == pytest.approx(1.0)
    assert rows["tflite"]["x_ort_fp32"] == pytest.approx(150 / 310)
    assert rows["tflite"]["x_pytorch_eager"] == pytest.approx(0.25)
    assert rows["pytorch eager"]["ceiling_fraction"] == pytest.approx(86e9 / 0.6 / 100e9)  # the fp32 ceiling
    assert rows["tflite"]["gflops"] == 50.0  # FLOPs of its own resolution
    md = res.markdown()
    row = next(_cells(ln) for ln in md.splitlines() if ln.startswith("| tflite"))
    assert "Fake CPU" in md and row[:4] == ["tflite", "336", "0.48", "0.25"]
    assert "28/30" in md and "XNNPACK GEMM ceilings: fp32 100.0, dynamic_int8 200.0, int8 400.0 GFLOP/s" in md
    assert valid_numbers(res) == ["onnxruntime fp32: no accuracy drift", "pytorch eager: no accuracy drift"]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_report_table_missing_values_and_columns():
    t = table([{"a": "x", "b": None}, {"a": "y", "b": 1.5}], [("a", "A", "s"), ("b", "B", ".1f")])
    lines = t.splitlines()
    assert _cells(lines[0]) == ["A", "B"] and lines[1].endswith(":|")  # numbers right-aligned
    assert _cells(lines[2]) == ["x", "–"] and _cells(lines[3]) == ["y", "1.5"]
    with pytest.raises(ValueError):
        table([], [])


def test_fresh_process_measures_rss_for_a_torchscript_file(tmp_path):
    """The child process loads a (tiny) TorchScript file and reports load time and a peak RSS above its baseline."""
    import torch

    class Tiny(torch.nn.Module):
        def forward(self, x):
            b = torch.sigmoid(x.mean(dim=(1, 2, 3)).reshape(1, 1, 1).expand(1, 5, 4))
            return b, torch.zeros(1, 5, 3), torch.zeros(1, 5, 2, 2)

    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(Tiny(), torch.zeros(1, 3, 8, 8)), str(path))
    res = backends.measure_in_fresh_process(BackendSpec("tiny", "torchscript", str(path), 8), runs=2)
    assert res["load_s"] > 0 and res["peak_rss_mb"] >= res["rss_after_import_mb"] > 50
    assert math.isfinite(res["model_rss_mb"])
    bad = BackendSpec("missing", "torchscript", str(tmp_path / "nope.pt"), 8)
    with pytest.raises(RuntimeError, match="missing"):
        backends.measure_in_fresh_process(bad)


def test_precision_ceilings_variant_flops_and_their_columns():
    """Each row is held against the XNNPACK ceiling of its own precision; option variants get their own FLOPs."""
    res = _fake_result()
    res.specs["tflite mq20"] = BackendSpec("tflite mq20", "tflite", "d.tflite", 432,
                                           meta={"precision": "fp32", "mask_queries": 20})
    res.latency[1]["tflite mq20"] = LatencyStats("m", [200.0]).summary()
    res.flops["432_mq20"] = {"gflops": 80.0, "gmacs": 40.0, "uncounted_ops": {}}
    res.ceilings = {1: {"fp32": 200.0, "dynamic_int8": 400.0, "int8": 800.0}}
    rows = {r["backend"]: r for r in res.rows(1)}
    assert rows["tflite"]["ceiling"] == "dynamic_int8"  # a dynamic-range int8 file: qd8 kernels
    assert rows["tflite"]["ceiling_fraction"] == pytest.approx(50e9 / 0.15 / 400e9)
    assert rows["pytorch eager"]["ceiling"] == "fp32"
    assert rows["pytorch eager"]["ceiling_fraction"] == pytest.approx(86e9 / 0.6 / 200e9)
    assert rows["tflite mq20"]["gflops"] == 80.0 and rows["tflite mq20"]["mask_queries"] == 20
    assert flops.flop_key(432, True, {"sampling": "tent", "mask_queries": 20}) == "432_tent_mq20"
    assert flops.flop_key(432, False) == -432 and flops.flop_key(432, True, {}) == 432
    md = res.markdown()
    assert "dynamic_int8 400.0" in md and "432 mq20: 80.0 GFLOP" in md


def test_measure_ceilings_floors_more_threads_at_the_one_thread_ceiling(monkeypatch):
    def fake(threads, seconds=1.0):
        return [ceilings.GemmProbe(p, t, 1, 1, 1, 5, {1: 100.0, 2: 90.0}[t] * (1 + i), 1.0, True)
                for t in threads for i, p in enumerate(ceilings.PRECISIONS)]

    monkeypatch.setattr(ceilings, "gemm_ceilings", fake)  # the binding measure_ceilings calls
    ceil, probes = ceilings.measure_ceilings([2])
    assert list(ceil) == [2] and len(probes) == 6  # the 1-thread probe runs too, as the floor
    assert ceil[2] == {"fp32": 100.0, "dynamic_int8": 200.0, "int8": 300.0}  # 2-thread probe under-measured


def test_converted_tflite_matches_sidecar_and_hash_and_never_converts(tmp_path):
    """The benchmark finds converted files through runtime's one discovery: checkpoint, route, precision, resolution
    and export options from the sidecar, and the file's sha256 still the sidecar's."""
    import json as _json

    from nailkit.core.artifacts import file_sha256
    from nailkit.runtime.discovery import find_tflite_artifacts

    find = discovery.converted_tflite
    d = tmp_path / "tflite" / "litert_432_abc"
    d.mkdir(parents=True)
    f = d / "model_fp32.tflite"
    f.write_bytes(b"x" * 100)
    meta = {"checkpoint_sha256": "sha1", "route": "litert", "resolution": 432, "precision": "fp32",
            "sha256": file_sha256(f, 64)}
    (d / "model_fp32.tflite.json").write_text(_json.dumps(meta))
    assert find(tmp_path, "sha1", "litert", "fp32", 432) == f
    f.write_bytes(b"y" * 100)  # edited in place: its sidecar no longer describes it
    assert find(tmp_path, "sha1", "litert", "fp32", 432) is None
    found, notes = find_tflite_artifacts(tmp_path, "sha1")
    assert found == [] and notes == [f"{f}: skipped (changed since its sidecar was written: sha256 differs)"]
    f.write_bytes(b"x" * 100)
    assert find(tmp_path, "other-checkpoint", "litert", "fp32", 432) is None
    assert find(tmp_path, "sha1", "litert", "fp16", 432) is None
    assert find(tmp_path, "sha1", "onnx2tf", "fp32", 432) is None
    assert find(tmp_path, "sha1", "litert", "fp32", 336) is None
    # a tent / top-N file is found only when asked for, never for the default
    t = tmp_path / "tflite" / "litert_432_tent_def"
    t.mkdir()
    (t / "model_fp32.tflite").write_bytes(b"z" * 100)
    (t / "model_fp32.tflite.json").write_text(_json.dumps(dict(meta, sampling="tent", mask_queries=None,
                                                                sha256=file_sha256(t / "model_fp32.tflite", 64))))
    assert find(tmp_path, "sha1", "litert", "fp32", 432) == f
    assert find(tmp_path, "sha1", "litert", "fp32", 432, sampling="tent") == t / "model_fp32.tflite"
    assert find(tmp_path, "sha1", "litert", "fp32", 432, mask_queries=20) is None
    f.unlink()  # a sidecar without its file is not an artifact
    assert find(tmp_path, "sha1", "litert", "fp32", 432) is None


def test_sweep_rows_speedup_against_same_family_at_base():
    specs = {"pytorch eager": BackendSpec("pytorch eager", "torch", "c.pth", 432),
             "pytorch eager @336": BackendSpec("pytorch eager @336", "torch", "c.pth", 336),
             "onnxruntime fp32": BackendSpec("onnxruntime fp32", "onnxruntime", "a.onnx", 432)}
    lat = {1: {"pytorch eager": LatencyStats("a", [600.0]).summary(),
               "pytorch eager @336": LatencyStats("b", [300.0]).summary(),
               "onnxruntime fp32": LatencyStats("c", [300.0]).summary()}}
    res = BenchResult(machine={"cpu": "x", "cpu_count": 2}, specs=specs, latency=lat, flops={},
                      drift={"pytorch eager @336": {"matched_top10": "7/10", "mean_min_mask_iou": 0.8}})
    rows = {(r["backend"], r["resolution"]): r for r in res.sweep_rows()}
    assert rows[("pytorch eager", 336)]["speedup"] == pytest.approx(2.0)
    assert rows[("pytorch eager", 432)]["speedup"] == pytest.approx(1.0)
    assert rows[("pytorch eager", 336)]["matched_top10"] == "7/10"
    assert "Resolution sweep" in res.markdown()


def test_cli_bench_rejects_bad_arguments_before_any_work(tmp_path, capsys):
    from nailkit.cli import main

    assert main(["bench", "--threads", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--threads" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_speed_targets_state_each_target_with_its_measurement():
    res = _fake_result()
    res.specs["tflite"].resolution = 432
    res.specs["tflite fp32"] = BackendSpec("tflite fp32", "tflite", "e.tflite", 432,
                                           meta={"route": "litert", "precision": "fp32"})
    res.specs["onnxruntime fp32 mq20"] = BackendSpec("onnxruntime fp32 mq20", "onnxruntime", "f.onnx", 432,
                                                     meta={"mask_queries": 20})
    res.latency[1]["tflite fp32"] = LatencyStats("f", [300.0]).summary()
    res.latency[1]["onnxruntime fp32 mq20"] = LatencyStats("q", [300.0]).summary()
    res.flops.update({"432_mq20": {"gflops": 84.5}, -432: {"gflops": 76.4}})
    res.ceilings = {1: {"fp32": 100.0, "dynamic_int8": 400.0, "int8": 400.0}}
    coverage = {"tflite fp32": {"xnnpack_nodes": 1605, "xnnpack_total": 1643, "xnnpack_fraction": 1605 / 1643,
                                "xnnpack_partitions": 5, "undelegated": {"TOPK_V2": {"count": 1}}}}
    rows = {t["target"]: t for t in targets.speed_targets(res, coverage, cpu={"int8_dot": ["avx512_vnni"]})}
    deleg = rows["≥ 99% of ops on XNNPACK in ≤ 3 partitions (tflite fp32)"]
    assert deleg["met"] is False and "97.7% in 5 partitions" in deleg["measured"] and "TOPK_V2×1" in deleg["why"]
    int8 = next(t for k, t in rows.items() if k.startswith("best int8 TFLite"))
    assert int8["met"] is False and "0.48×" in int8["measured"] and "4.00×" in int8["why"]
    fp32 = rows["fp32 TFLite ≤ 0.95× ORT fp32 (fp32 gates unchanged)"]
    assert fp32["met"] is False and "0.97×" in fp32["measured"]
    mq = next(t for k, t in rows.items() if k.startswith("--mask-queries 20"))
    assert mq["met"] is False and "0.968×" in mq["measured"] and "11.2%" in mq["why"] and "9.4% left" in mq["why"]
    assert table(list(rows.values()), bench_report.TARGET_COLUMNS).count("\n") == len(rows) + 1


def test_static_int8_rows_are_held_against_the_int8_ceiling():
    res = _fake_result()
    res.specs["tflite"].resolution = 432
    res.specs["tflite litert w8a8"] = BackendSpec("tflite litert w8a8", "tflite", "w.tflite", 432,
                                                  meta={"route": "litert", "precision": "w8a8"})
    res.latency[1]["tflite litert w8a8"] = LatencyStats("w", [100.0]).summary()
    res.ceilings = {1: {"fp32": 100.0, "dynamic_int8": 400.0, "int8": 800.0}}
    rows = {r["backend"]: r for r in res.rows(1)}
    assert rows["tflite litert w8a8"]["ceiling"] == "int8"  # qs8 kernels: the full-int8 ceiling
    assert ceilings.CEILING_OF_PRECISION["w8a16"] == "int8"
    assert set(targets.STATIC_INT8) <= set(ceilings.CEILING_OF_PRECISION)
    stated = targets.speed_targets(res, {}, cpu={"int8_dot": ["avx512_vnni"]})
    best = next(t for t in stated if t["target"].startswith("best int8 TFLite"))
    assert "tflite litert w8a8" in best["measured"]
    ceil = next(t for t in stated if t["target"].startswith("best int8 file"))
    assert "int8 ceiling" in ceil["measured"] and "static selective int8" in ceil["why"]


def test_static_int8_rows_compare_with_the_routes_fp32_file(tmp_path):
    import json as _json

    res = _fake_result()
    w = tmp_path / "model_w8a8.tflite"
    w.write_bytes(b"x" * 1000)
    (tmp_path / "model_w8a8.tflite.json").write_text(_json.dumps({
        "calibration": {"n": 8}, "recipe": {"quantized_ops": {"FULLY_CONNECTED": 72, "CONV_2D": 9, "QUANTIZE": 57}},
        "parity": {"control_ratio_max": 1.85}}))
    res.specs["tflite litert w8a8"] = BackendSpec("tflite litert w8a8", "tflite", str(w), 432,
                                                  meta={"route": "litert", "precision": "w8a8"})
    res.specs["tflite litert fp32"] = BackendSpec("tflite litert fp32", "tflite", str(w), 432,
                                                  meta={"route": "litert", "precision": "fp32"})
    res.latency[1]["tflite litert w8a8"] = LatencyStats("w", [60.0]).summary()
    res.latency[1]["tflite litert fp32"] = LatencyStats("f", [100.0]).summary()
    rows = targets.static_int8_rows(res, {"tflite litert w8a8": {"xnnpack_fraction": 0.9, "xnnpack_partitions": 4}})
    assert len(rows) == 1
    r = rows[0]
    assert r["x_tflite_fp32"] == pytest.approx(0.6) and r["quantized_linears"] == 81 and r["calibration_images"] == 8
    assert r["control_ratio_max"] == 1.85 and r["xnnpack_partitions"] == 4
    assert table(rows, bench_report.STATIC_INT8_COLUMNS).count("\n") == 2
