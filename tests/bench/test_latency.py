"""`graphwise bench latency` on CPU: eager and HF transformers on the same weights, JSON result."""

from __future__ import annotations

import json

import pytest

from graphwise.cli import main


def test_bench_latency_writes_complete_result(tiny_model_dir, tmp_path):
    out = tmp_path / "latency.json"
    rc = main(
        [
            "bench", "latency", "--model", str(tiny_model_dir("qwen2")), "--batch-sizes", "1,2",
            "--input-len", "8", "--output-len", "8", "--warmup-steps", "2",
            "--compare", "eager,eager-sync,graph,hf", "--output", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["settings"]["compare"] == ["eager", "eager-sync", "hf"]  # no graphs on CPU
    rows = {(r["batch_size"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(b, m) for b in (1, 2) for m in ("eager", "eager-sync", "hf")}
    assert (
        rows[(1, "eager")]["async_scheduling"] and not rows[(1, "eager-sync")]["async_scheduling"]
    )
    for r in rows.values():
        assert r["decode_steps_timed"] == 8 - 1 - 2  # 7 decode steps, 2 of them warm-up
        assert 0 < r["decode_median_ms"] <= r["decode_p90_ms"]
        assert r["x_floor"] == r["decode_median_ms"] / r["floor_ms"]
    assert rows[(1, "hf")]["hf_dtype"] == "float32"
    assert result["environment"]["device_type"] == "cpu"


def test_bench_latency_prices_sampling_features(tiny_model_dir, tmp_path):
    """-sampling modes: every request adds --sampling's fields (logprobs come back)."""
    out = tmp_path / "latency.json"
    sampling = '{"logprobs": 3, "presence_penalty": 0.5, "repetition_penalty": 1.2}'
    rc = main(
        [
            "bench", "latency", "--model", str(tiny_model_dir("qwen2")), "--batch-sizes", "2",
            "--input-len", "8", "--output-len", "6", "--warmup-steps", "1",
            "--compare", "eager,eager-sampling", "--sampling", sampling, "--output", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["settings"]["sampling"] == json.loads(sampling)
    rows = {r["mode"]: r for r in result["rows"]}
    assert rows["eager-sampling"]["requests_with_logprobs"] == 2
    assert rows["eager"]["requests_with_logprobs"] == 0


@pytest.mark.parametrize(
    "sampling, message",
    [("{", "not valid JSON"), ("[1]", "JSON object"), ('{"logprob": 1}', "logprob")],
)
def test_bench_latency_names_a_bad_sampling_option(tiny_model_dir, sampling, message, capsys):
    rc = main(
        [
            "bench", "latency", "--model", str(tiny_model_dir("qwen2")),
            "--compare", "eager-sampling", "--sampling", sampling,
        ]
    )  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "--sampling" in err and message in err


@pytest.mark.slow  # starts a second rank
def test_bench_latency_switches_modes_on_every_rank_under_tp(tiny_model_dir, tmp_path):
    """Graphs on or off for a run is a call every rank makes (it used to be rank 0's alone,
    so eager and graph could not be compared under TP)."""
    out = tmp_path / "latency-tp.json"
    rc = main(
        [
            "bench", "latency", "--model", str(tiny_model_dir("qwen2")), "--tp", "2",
            "--batch-sizes", "2", "--input-len", "4", "--output-len", "6", "--warmup-steps", "1",
            "--compare", "eager,eager-sync", "--output", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["eager", "eager-sync"]
    assert all(r["decode_steps_timed"] == 6 - 1 - 1 and r["graph_replays"] == 0 for r in rows)
