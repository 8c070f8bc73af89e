"""benchmarks/segment_cpu.py: the interval and the paired report (the runs themselves need ../shared and minutes)."""
import math

import pytest

from usp_fast_benchmarks.segment_cpu import report, segment_overrides, t_interval


def test_t_interval_is_students():
    m, lo, hi = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, df 2) x sd / sqrt(n)
    assert m == 2.0 and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    assert math.isnan(t_interval([5.0])[1])


def test_the_report_pairs_the_arms_by_seed():
    def run(miou):
        return {"mIoU": miou, "aAcc": 2 * miou, "mAcc": miou, "per_class": {"a": {"iou": miou}}}

    results = {("usp", 0): run(10.0), ("random", 0): run(9.0), ("usp", 1): run(12.0), ("random", 1): run(12.5)}
    doc = report(results, {"seeds": [0, 1]})
    assert doc["difference_usp_minus_random"]["per_seed"] == [1.0, -0.5]
    assert doc["arms"]["usp"]["mIoU_per_seed"] == [10.0, 12.0] and doc["arms"]["random"]["aAcc_mean"] == 21.5
    assert doc["runs"]["usp_s1"]["per_class_iou"] == {"a": 12.0}


def test_the_arms_differ_only_in_the_init(tmp_path):
    usp = segment_overrides(tmp_path, tmp_path, tmp_path / "export", "usp", 3, 250, 8)
    rnd = segment_overrides(tmp_path, tmp_path, tmp_path / "export", "random", 3, 250, 8)
    differ = [(a, b) for a, b in zip(usp, rnd) if a != b]
    assert [a.split("=")[0] for a, _ in differ] == ["run.name", "segment.init"]
