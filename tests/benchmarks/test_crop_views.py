"""The crop-views report: per-seed accuracies, the paired interval over seeds and images, and the table."""
import numpy as np

from usp_fast_benchmarks.crop_views import binomial_interval, paired_interval, report, table


def _arm(correct, views):
    return {"views": views, "top1": 100 * float(np.mean(correct)), "top5": 100.0, "correct": list(correct),
            "pretrain_seconds": 1.0}


def test_paired_interval_sees_a_real_difference_and_brackets_zero_for_none():
    rng = np.random.default_rng(0)
    a = (rng.random((2, 400)) < 0.4).astype(int)
    better = a.copy()
    better[:, :80] = 1  # +80 correct of 400 where a had some wrong: a clear gain
    diff, (lo, hi) = paired_interval(a, better, rounds=500)
    assert diff == 100 * (better.mean() - a.mean()) and 0 < lo < diff < hi
    same_diff, (lo, hi) = paired_interval(a, a, rounds=200)
    assert same_diff == 0 and lo == hi == 0  # pairing: identical arms differ by exactly 0 in every resample
    lo, hi = binomial_interval([1] * 40 + [0] * 60)
    assert lo < 40 < hi and hi - lo < 20


def test_report_and_table_combine_seeds():
    per_seed = {s: {"online": _arm([1, 0, 1, 0], None), "cache_v1": _arm([1, 1, 1, 0], 1)} for s in (0, 1)}
    doc = report(per_seed, {"experiment": "crop_views"})
    assert doc["seeds"] == [0, 1] and doc["arms"]["online"]["top1_per_seed"] == [50.0, 50.0]
    assert doc["arms"]["cache_v1"]["vs_online_pp"] == 25.0 and "vs_online_pp" not in doc["arms"]["online"]
    text = table(doc)
    assert "fresh every step" in text and "+25.0" in text and "50.0 / 50.0" in text
