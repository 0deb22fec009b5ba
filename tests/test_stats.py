"""Paired bootstrap intervals (clipprune.stats) against closed forms, and the gate judging by an interval."""
import math

import numpy as np
import pytest

from clipprune import report
from clipprune.stats import bits, paired_bootstrap, to_bits


def pair(n=2000, both=1000, only_a=200, only_b=100):
    """Two rows on n images: both right on `both`, only a on `only_a`, only b on `only_b`, both wrong on the rest."""
    a, b = np.zeros(n, bool), np.zeros(n, bool)
    a[: both + only_a] = True
    b[:both] = True
    b[both + only_a : both + only_a + only_b] = True
    return a, b


def test_interval_matches_the_closed_form_of_a_paired_binomial_difference():
    """acc(a) - acc(b) = (only_a - only_b) / n with variance (p10 + p01 - (p10 - p01)^2) / n (McNemar's setting):
    the percentile interval at 4,000 resamples sits on diff +- 1.96 se. Measured: the ends are within 4.9% of the
    half-width for seeds 0-9 (Monte Carlo error and the lattice of a binary mean); asserted at 6%."""
    n, p10, p01 = 2000, 200 / 2000, 100 / 2000
    a, b = pair()
    diff = p10 - p01
    half = 1.959964 * math.sqrt((p10 + p01 - diff**2) / n)
    got = paired_bootstrap({"x": a}, {"x": b}, resamples=4000, seed=0)
    assert got["x"]["diff"] == pytest.approx(diff, abs=1e-12)
    assert abs(got["x"]["lo"] - (diff - half)) <= 0.06 * half
    assert abs(got["x"]["hi"] - (diff + half)) <= 0.06 * half
    assert got["x"]["excludes_zero"] and got["mean"] == got["x"]


def test_pairing_cancels_what_both_rows_share():
    """The same accuracies (60% vs 55%) with 1,000 shared right answers have a narrower interval than
    independent ones would: the unpaired (two-sample) half-width is sqrt(p(1-p)/n + q(1-q)/n)."""
    n = 2000
    a, b = pair(n, both=1100, only_a=100, only_b=0)  # 60% vs 55%, every b-right image also a-right
    got = paired_bootstrap({"x": a}, {"x": b}, resamples=2000, seed=1)["x"]
    unpaired = 1.959964 * math.sqrt(0.6 * 0.4 / n + 0.55 * 0.45 / n)
    assert (got["hi"] - got["lo"]) / 2 < 0.5 * unpaired
    same = paired_bootstrap({"x": a}, {"x": a.copy()}, resamples=500, seed=1)["x"]
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "excludes_zero": False}


def test_mean_over_datasets_and_seeding():
    a1, b1 = pair(1000, 500, 50, 40)
    a2, b2 = pair(500, 200, 10, 30)
    one = paired_bootstrap({"d1": a1, "d2": a2}, {"d1": b1, "d2": b2}, resamples=1000, seed=3)
    assert one["mean"]["diff"] == pytest.approx((one["d1"]["diff"] + one["d2"]["diff"]) / 2, abs=1e-6)
    assert one == paired_bootstrap({"d1": a1, "d2": a2}, {"d1": b1, "d2": b2}, resamples=1000, seed=3)
    assert one != paired_bootstrap({"d1": a1, "d2": a2}, {"d1": b1, "d2": b2}, resamples=1000, seed=4)
    with pytest.raises(ValueError, match="different lengths"):
        paired_bootstrap({"d": a1}, {"d": a2}, resamples=10)


def test_bits_round_trip():
    x = np.array([True, False, False, True, True])
    assert to_bits(x) == "10011" and np.array_equal(bits(to_bits(x)), x)


def records(full, method):
    return {"synth/a": {"full": {"metrics": {"acc1": full.mean()}, "gflops": 1.0, "per_image_top1": to_bits(full)},
                        "predictor": {"metrics": {"acc1": method.mean()}, "gflops": 0.7, "per_image_top1": to_bits(method)}}}


def test_the_gate_can_judge_the_upper_end_of_the_drop():
    """Drop 2 points observed on 500 images: within max_drop 0.03 by the point estimate, but its interval reaches
    beyond 3 points, so drop_estimate: upper fails it."""
    full, method = pair(500, both=300, only_a=20, only_b=10)
    metrics = report.build_metrics(records(full, method), resamples=2000, seed=0)
    vs = metrics["intervals"]["predictor"]["vs_full"]["mean"]
    assert vs["diff"] == pytest.approx(-0.02, abs=1e-9) and -vs["lo"] > 0.03
    assert report.gate(metrics, None, method="predictor", max_drop=0.03, tolerance=0.01) == []
    (failure,) = report.gate(metrics, None, method="predictor", max_drop=0.03, tolerance=0.01, estimate="upper")
    assert "upper end of its 95% interval" in failure
    md = "\n".join(report.differences_markdown(metrics["intervals"], ["synth/a"]))
    assert f"{100 * vs['diff']:+.1f} [{100 * vs['lo']:+.1f}, {100 * vs['hi']:+.1f}]" in md
