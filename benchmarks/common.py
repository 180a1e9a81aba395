"""Benchmark helpers: the real data's location, medians of repeated timings, peak memory while code runs."""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
REAL_ZIP = os.path.join(ROOT, "..", "shared", "data", "dsb2018", "stage1_train.zip")


def require_real_zip() -> str:
    if not os.path.isfile(REAL_ZIP):
        sys.exit(f"skipped: real DSB2018 data not found at {os.path.normpath(REAL_ZIP)}")
    return REAL_ZIP


def interleaved_medians(functions: dict, repeats: int = 5) -> dict:
    """Median seconds of each function, run in turns (a, b, a, b, ...) so that drifts in machine load hit all alike."""
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def used_memory() -> int:
    """Bytes of memory in use on this machine (MemTotal - MemAvailable), read from /proc/meminfo."""
    values = {}
    with open("/proc/meminfo") as stream:
        for line in stream:
            key, value = line.split(":", 1)
            values[key] = int(value.split()[0]) * 1024
    return values["MemTotal"] - values["MemAvailable"]


class PeakOf:
    """Peak of `measure()` (bytes), sampled every `interval` seconds while a block runs; `baseline` is its value at
    the start."""

    def __init__(self, measure, interval: float = 0.05):
        self.measure, self.interval = measure, interval

    def __enter__(self):
        self.baseline = self.measure()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.measure())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> float:
        """The peak's rise over the baseline, MiB."""
        return (self.peak - self.baseline) / 2**20

    @property
    def peak_mib(self) -> float:
        """The peak itself, MiB."""
        return self.peak / 2**20


class PeakMemory(PeakOf):
    """Peak rise of the machine's used memory (all processes: driver, Ray workers, object store) during a block."""

    def __init__(self):
        super().__init__(used_memory)
