"""The benchmarks' own helpers: what they measure and print (their timings are not tests)."""
import os
import sys

import numpy as np

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from common import PeakMemory, PeakOf, interleaved_medians  # noqa: E402


def test_peaks_report_the_rise_and_the_peak():
    readings = iter([100 * 2**20] + [300 * 2**20] * 1000)
    with PeakOf(lambda: next(readings), interval=0.001) as peak:
        while peak.peak == peak.baseline:
            pass
    assert peak.mib == 200 and peak.peak_mib == 300
    with PeakMemory() as machine:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert machine.mib >= 0 and machine.peak_mib > 64 and block.sum() > 0


def test_interleaved_medians_time_every_function():
    calls = []
    medians = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] * 3 and set(medians) == {"a", "b"} and all(value >= 0 for value in medians.values())


def test_the_peer_tables_print_each_side_and_the_ratios():
    from peers import format_accuracy, format_speed

    row = {"seconds": 10.0, "images": 5, "images_per_s": 0.5, "mpixel_per_s": 1.0, "peak_mib": 100.0,
           "process_mib": 200.0, "nuclei": 50}
    table = format_speed({"5 images": {"StarDist": row, "ours plain": {**row, "images_per_s": 2.0},
                                       "ours stored": {**row, "images_per_s": 1.0}}})
    assert "ratio ours plain / StarDist: speed 4.00" in table and "ratio ours stored / StarDist: speed 2.00" in table
    kinds = [{"kind": "all", "images": 3, "score": 0.5, "score_iou50": 0.7}]
    text = format_accuracy({"images": 3, "thresholds": {"prob": 0.5, "nms": 0.3},
                            "table": {"StarDist": kinds, "ours plain": kinds,
                                      "ours stored": [{**kinds[0], "score": 0.6}]}})
    assert "ours stored - StarDist" in text and "+0.100" in text


def test_the_steps_comparison_adds_one_post_processing_step_at_a_time():
    from segment import cumulative_steps

    sides = list(cumulative_steps().values())
    switched_on = [sorted(name for name, on in side.items() if on) for side in sides]
    assert switched_on == [[], ["split_clumps"], ["instance_filter", "split_clumps"],
                           ["instance_filter", "refine_outlines", "split_clumps"]]
