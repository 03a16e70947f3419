"""Interleaved latency: every backend timed in the same rounds, so machine noise hits them alike.

All backends live in one process; after a warm-up, each round runs every backend once, in an order rotated by one
per round (``rotated_order``), so a burst of noise hits every backend in that round instead of whichever happened to
run then. Per backend: median and p90 (linear interpolation, ``percentile``) of the rounds (``LatencyStats``).
``ratios`` turns medians into the headline numbers: latency ÷ a reference's latency (< 1 = faster).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np


def percentile(samples: Sequence[float], q: float) -> float:
    """Percentile with linear interpolation between order statistics (numpy's default 'linear' method)."""
    if not len(samples):
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must lie in [0, 100]; got {q}")
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


@dataclass
class LatencyStats:
    """Latencies of one backend, milliseconds."""

    name: str
    samples_ms: list[float]

    def __post_init__(self) -> None:
        if not self.samples_ms:
            raise ValueError(f"{self.name}: no latency samples")
        bad = [s for s in self.samples_ms if not (math.isfinite(s) and s >= 0)]
        if bad:
            raise ValueError(f"{self.name}: invalid latency samples {bad[:3]}")

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return percentile(self.samples_ms, 50)

    @property
    def p90_ms(self) -> float:
        return percentile(self.samples_ms, 90)

    @property
    def min_ms(self) -> float:
        return float(min(self.samples_ms))

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.samples_ms))

    def summary(self) -> dict[str, float]:
        return {"n": self.n, "median_ms": self.median_ms, "p90_ms": self.p90_ms, "min_ms": self.min_ms,
                "mean_ms": self.mean_ms}


def rotated_order(names: Sequence[str], round_index: int) -> list[str]:
    """Order of round ``round_index``: the list rotated left by ``round_index`` (every backend leads in turn)."""
    n = len(names)
    return [names[(round_index + i) % n] for i in range(n)] if n else []


def interleaved_latency(fns: Mapping[str, Callable[[], Any]], *, runs: int = 10, warmup: int = 2,
                        clock: Callable[[], float] = time.perf_counter,
                        order_log: Optional[list[list[str]]] = None) -> dict[str, LatencyStats]:
    """Time every callable ``runs`` times, interleaved: round r runs all of them in ``rotated_order(names, r)``.

    ``warmup`` untimed rounds (same rotation) come first. ``order_log`` (if given) receives each timed round's order.
    Returns ``{name: LatencyStats}``. A callable that raises aborts the whole measurement with its name.
    """
    if not fns:
        raise ValueError("interleaved_latency: no backends given")
    if int(runs) != runs or runs < 1:
        raise ValueError(f"runs must be a positive integer; got {runs!r}")
    if int(warmup) != warmup or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer; got {warmup!r}")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"backend {name!r} is not callable ({type(fn).__name__})")
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for w in range(int(warmup)):
        for name in rotated_order(names, w):
            _call(name, fns[name])
    for r in range(int(runs)):
        order = rotated_order(names, r)
        if order_log is not None:
            order_log.append(order)
        for name in order:
            t0 = clock()
            _call(name, fns[name])
            samples[name].append((clock() - t0) * 1000.0)
    return {n: LatencyStats(n, s) for n, s in samples.items()}


def _call(name: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - name the backend that failed
        raise RuntimeError(f"backend {name!r} failed during the benchmark: {type(exc).__name__}: {exc}") from exc


def ratios(values: Mapping[str, float], reference: str) -> dict[str, float]:
    """``values[name] / values[reference]`` for every name (latency ratio: < 1 means faster than the reference)."""
    if reference not in values:
        raise KeyError(f"reference {reference!r} not among the measured backends {sorted(values)}")
    ref = float(values[reference])
    if not (math.isfinite(ref) and ref > 0):
        raise ValueError(f"reference {reference!r} has no positive value ({ref})")
    return {k: float(v) / ref for k, v in values.items()}
