"""Arrival times and metric arithmetic on synthetic timings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graphwise.bench.metrics import RequestResult, arrival_times, compute_metrics


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 3.0])
def test_arrival_rate(burstiness):
    rate, n = 4.0, 20000
    t = arrival_times(n, rate, burstiness, seed=0)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert (n - 1) / t[-1] == pytest.approx(rate, rel=0.05)
    gaps = np.diff(t)
    # Gamma gaps: coefficient of variation 1/sqrt(shape); Poisson: 1.
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)


def test_arrival_seeded():
    a = arrival_times(100, 2.0, 1.0, seed=7)
    assert np.array_equal(a, arrival_times(100, 2.0, 1.0, seed=7))
    assert not np.array_equal(a, arrival_times(100, 2.0, 1.0, seed=8))
    assert not np.array_equal(arrival_times(100, 2.0, 0.5, seed=7), a)


def test_arrival_inf_and_edges():
    assert np.array_equal(arrival_times(5, math.inf), np.zeros(5))
    assert arrival_times(0, 1.0).size == 0
    assert arrival_times(1, 1.0).tolist() == [0.0]
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError):
            arrival_times(3, bad)
    with pytest.raises(ValueError):
        arrival_times(3, 1.0, burstiness=0.0)


def _r(prompt, out, ttft, latency, itl, success=True):
    return RequestResult(
        prompt_len=prompt,
        output_tokens=out if success else None,
        ttft=ttft,
        latency=latency,
        itl=itl,
        success=success,
        error="" if success else "HTTP 500: boom",
    )


def test_metrics_hand_computed():
    results = [
        _r(10, 5, 0.1, 0.5, [0.1] * 4),  # tpot (0.5 - 0.1) / 4 = 0.1
        _r(20, 3, 0.2, 0.6, [0.2] * 2),  # tpot 0.4 / 2 = 0.2
        _r(30, 1, 0.3, 0.3, []),  # one token: no tpot
        _r(40, 0, 0.0, 0.0, [], success=False),
    ]
    m = compute_metrics(results, duration=2.0)
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 9
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(34.5)
    expected = {
        "ttft": (200.0, 200.0, math.sqrt(20000 / 3), 298.0),
        "tpot": (150.0, 150.0, 50.0, 199.0),
        "itl": (800 / 6, 100.0, math.sqrt(20000 / 9), 200.0),
        "e2el": (
            1400 / 3,
            500.0,
            math.sqrt(((500 - 1400 / 3) ** 2 + (600 - 1400 / 3) ** 2 + (300 - 1400 / 3) ** 2) / 3),
            598.0,
        ),
    }
    for metric, (mean, median, std, p99) in expected.items():
        assert m[f"mean_{metric}_ms"] == pytest.approx(mean), metric
        assert m[f"median_{metric}_ms"] == pytest.approx(median), metric
        assert m[f"std_{metric}_ms"] == pytest.approx(std), metric
        assert m[f"p99_{metric}_ms"] == pytest.approx(p99), metric


def test_metrics_all_failed():
    m = compute_metrics([_r(5, 0, 0, 0, [], success=False)] * 2, duration=1.0)
    assert m["completed"] == 0 and m["failed"] == 2
    assert m["output_throughput"] == 0.0
    assert m["mean_ttft_ms"] is None and m["p99_itl_ms"] is None


def test_metrics_require_output_tokens():
    r = _r(5, 2, 0.1, 0.2, [0.1])
    r.output_tokens = None
    with pytest.raises(ValueError):
        compute_metrics([r], duration=1.0)
