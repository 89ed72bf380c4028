"""End to end against a real `graphwise serve` (the tiny chat model: random weights, SmolLM2's
tokenizer, on CPU) and the offline API. Slow: each starts processes. The server runs on a free 127.0.0.1 port and is always
stopped (SIGTERM, then SIGKILL) by `ServerProcess`, whatever the test does."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from graphwise import cli
from graphwise.bench import serve, sweep

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def graphwise_server(tmp_path_factory, tiny_chat_dir):
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--max-num-seqs", "16", "--model", str(tiny_chat_dir)]
    server = sweep.ServerProcess(args, log, shutdown_grace_s=15)
    try:
        server.start()
        server.wait_ready(STARTUP_TIMEOUT_S)
        yield server
    finally:
        server.stop()
    assert not server.alive()


def test_bench_serve_against_graphwise_serve(graphwise_server, tmp_path, tiny_chat_dir):
    out = tmp_path / "serve.json"
    rc = cli.main(
        [
            "bench",
            "serve",
            "--base-url",
            graphwise_server.base_url,
            "--dataset",
            "sharegpt",
            "--num-prompts",
            "24",
            "--sharegpt-output-len",
            "16",
            "--request-rate",
            "8",
            "--max-concurrency",
            "8",
            "--request-timeout",
            "300",
            "--save-result",
            str(out),
            "--disable-tqdm",
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["errors"] == [] and result["failed"] == 0
    assert result["completed"] == 24
    assert result["total_output_tokens"] == 24 * 16  # ignore_eos: every request runs to max_tokens
    assert result["total_input_tokens"] > 24 * 4
    assert result["tokenizer"] == str(tiny_chat_dir.resolve())  # found through /v1/models' root
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p99"):
            value = result[f"{stat}_{metric}_ms"]
            assert isinstance(value, float) and value >= 0, f"{stat}_{metric}_ms"
    assert result["mean_ttft_ms"] <= result["mean_e2el_ms"]
    for key in ("duration", "request_throughput", "output_throughput", "total_token_throughput"):
        assert result[key] > 0
    for key in ("date", "base_url", "model", "dataset", "num_prompts", "request_rate", "seed"):
        assert key in result


def test_bench_serve_chat_endpoint(graphwise_server):
    args = serve.parse_args(
        [
            "--base-url",
            graphwise_server.base_url,
            "--endpoint",
            "/v1/chat/completions",
            "--dataset",
            "random",
            "--random-input-len",
            "32",
            "--random-output-len",
            "8",
            "--num-prompts",
            "4",
            "--disable-tqdm",
        ]
    )
    result = serve.execute(args)
    assert result["failed"] == 0, result["errors"]
    assert result["total_output_tokens"] == 4 * 8


def test_tiny_sweep(tmp_path, tiny_chat_dir):
    """benchmarks/sweep-cpu-tiny.yaml as shipped, but on the tiny chat model at a higher rate
    (the shipped file runs the real model at 1 qps: the same code, 40 s longer)."""
    import yaml

    spec = yaml.safe_load((REPO / "benchmarks" / "sweep-cpu-tiny.yaml").read_text())
    spec["server"]["args"] += ["--model", str(tiny_chat_dir)]
    spec["bench"].update(num_prompts=6, request_rates=[6])
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    rc = cli.main(["bench", "sweep", str(config), "--output-dir", str(out), "--disable-tqdm"])
    assert rc == 0, (out / "sweep.md").read_text() if (out / "sweep.md").exists() else rc
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 2 and {r["cuda_graph"] for r in rows} == {"auto", "off"}
    assert all(r["completed"] == r["num_prompts"] == "6" and not r["error"] for r in rows)
    md = (out / "sweep.md").read_text()
    assert "| Model | Parallel Config | cuda graph | qps |" in md
    for name in ("throughput_vs_qps.png", "ttft_vs_qps.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert len(list(out.glob("*-qps6.json"))) == 2
    assert not sweep._LIVE


def test_bench_offline(tmp_path, tiny_chat_dir):
    out = tmp_path / "offline.json"
    rc = cli.main(
        [
            "bench",
            "offline",
            "--model",
            str(tiny_chat_dir),
            "--num-prompts",
            "4",
            "--input-len-range",
            "16-32",
            "--output-len-range",
            "4-8",
            "--max-num-seqs",
            "4",
            "--output",
            str(out),
            "--disable-tqdm",
            "--compare-async-scheduling",
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["num_requests"] == 4
    on, off = result["runs"]
    assert on["async_scheduling"] and not off["async_scheduling"]
    assert (
        on["total_output_tokens"] == off["total_output_tokens"] == result["expected_output_tokens"]
    )
    for run in (on, off):
        b = run["step_breakdown"]
        assert b["prefill_steps"]["steps"] >= 1 and b["decode_steps"]["steps"] >= 3
        assert b["elapsed_in_steps_s"] <= run["elapsed_time"]
        assert "x_floor" not in b["decode_steps"]  # no bandwidth measured on CPU: no floor
        assert sum(x["steps"] for x in b["decode_by_batch"]) == b["decode_steps"]["steps"]
    assert result["total_output_tokens"] == result["expected_output_tokens"]
    assert 4 * 16 <= result["total_input_tokens"] <= 4 * 32
    assert result["output_tokens_per_second"] > 0 and result["elapsed_time"] > 0
    assert result["device"]["type"] in ("cpu", "cuda") and result["versions"]["torch"]


def test_bench_offline_data_parallel(tmp_path, tiny_chat_dir):
    """The data-parallel front runs the workload (no step breakdown: its steps run in the
    replicas) and refuses the async on/off comparison it cannot make."""
    out = tmp_path / "offline-dp.json"
    argv = [
        "bench", "offline", "--model", str(tiny_chat_dir), "--num-prompts", "4",
        "--input-len-range", "16-32",
        "--output-len-range", "4-8", "--max-num-seqs", "4", "--dp", "2", "--disable-tqdm",
    ]  # fmt: skip
    assert cli.main(argv + ["--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["total_output_tokens"] == result["expected_output_tokens"]
    assert "step_breakdown" not in result["runs"][0]
    assert cli.main(argv + ["--compare-async-scheduling"]) != 0
