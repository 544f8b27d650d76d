"""Warm-up, then repeated runs: every figure is a median with its min and max.

A :class:`Measurement` keeps its raw samples so the report can show min/max and a later reader
can recompute anything. Comparisons are ratios of medians taken in the same run
(:func:`ratio`), never against numbers from another machine or day.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence


@dataclass
class Measurement:
    """Repeated samples of one quantity (``unit``: ms, tok/s, MB, ...)."""

    samples: List[float]
    unit: str = "ms"
    warmup: int = 0
    higher_is_better: bool = False

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("a measurement needs at least one sample")
        self.samples = [float(s) for s in self.samples]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def repeats(self) -> int:
        return len(self.samples)

    def to_dict(self) -> dict:
        return {"median": self.median, "min": self.min, "max": self.max, "unit": self.unit,
                "repeats": self.repeats, "warmup": self.warmup, "higher_is_better": self.higher_is_better,
                "samples": self.samples}

    @classmethod
    def from_dict(cls, d: dict) -> "Measurement":
        return cls(list(d["samples"]), d.get("unit", "ms"), d.get("warmup", 0), d.get("higher_is_better", False))

    def map(self, fn: Callable[[float], float], unit: str, higher_is_better: bool = False) -> "Measurement":
        """A derived measurement, sample by sample (e.g. ms per prompt -> tokens/s)."""
        return Measurement([fn(s) for s in self.samples], unit, self.warmup, higher_is_better)

    def __str__(self) -> str:
        return f"{fmt(self.median)} {self.unit} [{fmt(self.min)}–{fmt(self.max)}]"


def fmt(value: Optional[float]) -> str:
    """Three significant figures, no exponent for the sizes benchmarks produce."""
    if value is None:
        return "—"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def measure(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Optional[Callable[[], None]] = None,
            on_sample: Optional[Callable[[], None]] = None) -> Measurement:
    """Wall time of ``fn()`` in ms: ``warmup`` discarded runs, then ``repeats`` timed ones.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the clock is read on both ends, so
    asynchronous GPU work is inside the interval."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        fn()
        if on_sample:
            on_sample()
    samples = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - start) * 1e3)
        if on_sample:
            on_sample()
    return Measurement(samples, "ms", warmup)


def measure_interleaved(fns: dict, repeats: int, warmup: int = 1, sync: Optional[Callable[[], None]] = None,
                        on_sample: Optional[Callable[[], None]] = None) -> dict:
    """:func:`measure` for several callables whose ratios are wanted (a tower and its parts): each
    round runs every one once, starting one further along each round, so slow drift of a small
    shared machine (another process, clock or thermal state) falls on all of them alike instead of
    on whichever ran last. Returns name -> Measurement."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
            if on_sample:
                on_sample()
    samples: dict = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if sync:
                sync()
            start = time.perf_counter()
            fns[name]()
            if sync:
                sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
            if on_sample:
                on_sample()
    return {name: Measurement(values, "ms", warmup) for name, values in samples.items()}


def collect(run: Callable[[], dict], repeats: int, warmup: int = 1, units: Optional[dict] = None,
            higher_is_better: Sequence[str] = ()) -> dict:
    """Like :func:`measure` for a run that reports several quantities itself (a dict name ->
    value, e.g. prefill ms and decode tok/s of one generation): one Measurement per name."""
    for _ in range(warmup):
        run()
    results: dict = {}
    for _ in range(repeats):
        for name, value in run().items():
            results.setdefault(name, []).append(value)
    units = units or {}
    return {name: Measurement(values, units.get(name, "ms"), warmup, name in higher_is_better)
            for name, values in results.items()}


def ratio(numerator: Measurement | float, denominator: Measurement | float) -> Optional[float]:
    """Ratio of medians (None when the denominator is zero)."""
    a = numerator.median if isinstance(numerator, Measurement) else float(numerator)
    b = denominator.median if isinstance(denominator, Measurement) else float(denominator)
    return None if b == 0 else a / b
