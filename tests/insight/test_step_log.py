"""StepLog's arithmetic: decode steps against their byte floor, binned by batch size."""

from __future__ import annotations

import pytest

from graphwise.insight.step_log import StepLog, StepRecord, format_summary


def _rec(seqs: int, prefill: int, context: int, total_s: float, wait_s: float = 0.0) -> StepRecord:
    return StepRecord(
        seqs=seqs,
        tokens=seqs + prefill,
        prefill_tokens=prefill,
        context_tokens=context,
        schedule_s=0.001,
        launch_s=0.002,
        wait_s=wait_s,
        process_s=total_s - 0.003 - wait_s,
        total_s=total_s,
    )


def test_summary_against_floor_and_bins():
    log = StepLog()
    log.add(_rec(4, 400, 400, 0.050))  # prefill
    for _ in range(3):
        log.add(_rec(4, 0, 1000, 0.010, wait_s=0.006))  # decode at batch 4
    log.add(_rec(200, 0, 100_000, 0.020, wait_s=0.015))  # decode at batch 200
    log.add(_rec(0, 0, 0, 0.004))  # a drain-only call
    # weights 1e9 B, 10 B per token of KV, 1e12 B/s: floor = 1 ms + context * 1e-5 ms
    s = log.summary(10**9, 10, 1e12)
    assert s["steps"] == 6 and s["other_steps"] == 1
    assert s["prefill_steps"]["steps"] == 1
    d = s["decode_steps"]
    assert d["steps"] == 4
    floor = 3 * (1e9 + 1e4) / 1e12 + (1e9 + 1e6) / 1e12
    assert d["floor_s"] == pytest.approx(floor)
    assert d["x_floor"] == pytest.approx(0.050 / floor)
    assert d["wait_ms_mean"] == pytest.approx((3 * 6 + 15) / 4)
    assert d["host_ms_mean"] == pytest.approx((3 * 4 + 5) / 4)
    bins = {b["batch_from"]: b for b in s["decode_by_batch"]}
    assert bins[1]["steps"] == 3 and bins[128]["steps"] == 1
    assert bins[128]["step_ms_median"] == pytest.approx(20.0)
    assert "decode" in format_summary(s)


def test_summary_without_bandwidth_has_no_floor():
    log = StepLog()
    log.add(_rec(2, 0, 10, 0.01))
    s = log.summary(10**9, 10, None)
    assert "x_floor" not in s["decode_steps"]
    assert StepLog().summary(1, 1, 1.0)["decode_steps"] == {"steps": 0}
