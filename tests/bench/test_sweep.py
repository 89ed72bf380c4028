"""`bench sweep`: config schema, table writers, plots, and server process handling (with a fake
server process standing in for `graphwise serve`)."""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from graphwise.bench import sweep

REPO = Path(__file__).resolve().parents[2]
FAKE_SERVER_SCRIPT = Path(__file__).with_name("fake_openai_server.py")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie waiting for a reaper counts as gone
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def test_shipped_configs_parse():
    h100 = sweep.load_config(REPO / "benchmarks" / "sweep-h100-single.yaml")
    assert [s.cuda_graph for s in h100.setups] == ["on", "off"]
    for s in h100.setups:
        assert s.request_rates == [1, 2, 4, 8]
        assert s.label == "Qwen2.5-7B" and s.parallel == "TP=1"
        assert s.server_args[:4] == ["--preset", "qwen2.5-7b", "--load-format", "dummy"]
        assert "--dataset" in s.bench_argv and "sharegpt" in s.bench_argv
    tiny = sweep.load_config(REPO / "benchmarks" / "sweep-cpu-tiny.yaml")
    assert len(tiny.setups) == 2 and all(len(s.request_rates) == 1 for s in tiny.setups)
    assert all(
        "--model" not in s.server_args and "--preset" not in s.server_args for s in tiny.setups
    )
    assert tiny.setups[0].label == "SmolLM2-135M (embedded)"
    overlap = sweep.load_config(REPO / "benchmarks" / "sweep-h100-async.yaml")
    assert [(s.cuda_graph, s.async_scheduling) for s in overlap.setups] == [
        ("on", "on"),
        ("on", "off"),
    ]


def _config(**overrides):
    data = {
        "bench": {"dataset": "random", "num_prompts": 4, "request_rates": [1, "inf"]},
        "setups": [
            {"name": "a", "cuda_graph": True, "tensor_parallel_size": 2, "data_parallel_size": 2},
            {
                "name": "b",
                "cuda_graph": False,
                "args": ["--max-num-seqs", "4"],
                "request_rates": [0.5],
                "bench": {"num_prompts": 2},
            },
        ],
    }
    data.update(overrides)
    return data


def test_config_expansion():
    cfg = sweep.parse_config(_config(), "x")
    a, b = cfg.setups
    assert cfg.name == "x"
    assert a.cuda_graph == "on" and b.cuda_graph == "off"  # YAML booleans from bare on/off
    assert a.request_rates == [1.0, math.inf] and b.request_rates == [0.5]
    assert a.parallel == "TP=2, DP=2" and b.parallel == "TP=1"
    assert "--tensor-parallel-size" in a.server_args and "--cuda-graph" in a.server_args
    assert b.server_args[-2:] == ["--max-num-seqs", "4"]
    assert b.bench_argv[b.bench_argv.index("--num-prompts") + 1] == "2"
    assert yaml.safe_load("cuda_graph: on")["cuda_graph"] is True  # why booleans are accepted


@pytest.mark.parametrize(
    "change, message",
    [
        ({"setups": [{"name": "a", "cuda_grahp": "on"}]}, "unknown key"),
        ({"setups": [{"name": "a", "cuda_graph": "sometimes"}]}, "on, off or auto"),
        ({"setups": [{"name": "a"}, {"name": "a"}]}, "duplicate"),
        ({"setups": [{"cuda_graph": "on"}]}, "name is required"),
        ({"setups": []}, "non-empty"),
        ({"bench": {"request_rates": [0]}}, "positive"),
        ({"bench": {"request_rates": [1], "base_url": "http://x"}}, "sets base_url"),
        ({"bench": {"request_rates": [1], "dataset": "nope"}}, "invalid bench"),
        ({"bench": {"dataset": "random"}}, "no request_rates"),
        ({"setups": [{"name": "a", "model": "m", "preset": "p"}]}, "not both"),
        ({"typo": 1}, "unknown key"),
        ({"bench": {"request_rates": [1], "num_prompt": 3}}, "unknown key"),
        ({"setups": [{"name": "a", "bench": {"seeed": 1}}]}, "unknown key"),
    ],
)
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        sweep.parse_config(_config(**change))


def test_columns_follow_the_server_flags():
    cfg = sweep.parse_config(
        {
            "bench": {"request_rates": [1]},
            "setups": [
                {"name": "a", "args": ["--tp", "4", "--cuda-graph=off"]},
                {
                    "name": "b",
                    "cuda_graph": "on",
                    "enforce_eager": True,
                    "pipeline_parallel_size": 2,
                },
            ],
        }
    )
    a, b = cfg.setups
    assert (a.parallel, a.cuda_graph) == ("TP=4", "off")
    assert (b.parallel, b.cuda_graph) == ("TP=1, PP=2", "off")
    assert a.async_scheduling == b.async_scheduling == "on"


def test_async_scheduling_setups():
    cfg = sweep.parse_config(
        {
            "bench": {"request_rates": [1]},
            "setups": [
                {"name": "on", "cuda_graph": "on", "async_scheduling": True},
                {"name": "off", "cuda_graph": "on", "async_scheduling": False},
                {"name": "sglang", "args": ["--disable-overlap-schedule"]},
            ],
        }
    )
    on, off, sglang = cfg.setups
    assert "--async-scheduling" in on.server_args and on.async_scheduling == "on"
    assert "--no-async-scheduling" in off.server_args and off.async_scheduling == "off"
    assert sglang.async_scheduling == "off"
    row = sweep._row(off, 2.0, None, "")
    assert row["async_scheduling"] == "off"
    assert sweep.table_cells(row)[2] == "on (async scheduling off)"
    assert sweep.table_cells(sweep._row(on, 2.0, None, ""))[2] == "on"
    with pytest.raises(ValueError, match="async_scheduling must be true or false"):
        sweep.parse_config(
            {"bench": {"request_rates": [1]}, "setups": [{"name": "x", "async_scheduling": "no"}]}
        )


def test_preset_defaults_to_dummy_weights():
    cfg = sweep.parse_config(
        {"bench": {"request_rates": [1]}, "setups": [{"name": "p", "preset": "qwen2.5-7b"}]}
    )
    args = cfg.setups[0].server_args
    assert args[args.index("--load-format") + 1] == "dummy"
    assert cfg.setups[0].cuda_graph == "auto"


ROWS = [
    {
        "setup": "on",
        "model": "M",
        "parallel": "TP=1",
        "cuda_graph": "on",
        "qps": "1",
        "output_throughput": 100.0,
        "mean_ttft_ms": 20.0,
        "median_tpot_ms": 5.0,
        "p99_ttft_ms": 40.0,
        "p99_itl_ms": 9.0,
        "completed": 10,
        "num_prompts": 10,
        "error": "",
    },
    {
        "setup": "on",
        "model": "M",
        "parallel": "TP=1",
        "cuda_graph": "on",
        "qps": "inf",
        "output_throughput": 300.0,
        "mean_ttft_ms": 80.0,
        "median_tpot_ms": 7.0,
        "p99_ttft_ms": 90.0,
        "p99_itl_ms": 12.0,
        "completed": 10,
        "num_prompts": 10,
        "error": "",
    },
    {
        "setup": "off",
        "model": "M",
        "parallel": "TP=1",
        "cuda_graph": "off",
        "qps": "1",
        "output_throughput": None,
        "mean_ttft_ms": None,
        "median_tpot_ms": None,
        "p99_ttft_ms": None,
        "p99_itl_ms": None,
        "completed": 0,
        "num_prompts": None,
        "error": "ServerError: the server exited with code 1",
    },
]


def test_table_writers_and_plots(tmp_path):
    md = tmp_path / "t.md"
    sweep.write_markdown(ROWS, md, "title", "notes")
    lines = md.read_text().splitlines()
    assert lines[0] == "# title"
    header = next(line for line in lines if line.startswith("| Model"))
    assert header == (
        "| Model | Parallel Config | cuda graph | qps | throughput (output tok/s) | "
        "ttft (mean ms) | tpot (median ms) | ttft (p99 ms) | itl (p99 ms) | completed |"
    )
    assert "| M | TP=1 | on | 1 | 100.0 | 20.00 | 5.00 | 40.00 | 9.00 | 10/10 |" in lines
    assert any("n/a" in line and "failed: ServerError" in line for line in lines)
    path = tmp_path / "t.csv"
    sweep.write_csv(ROWS, path)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 3 and rows[1]["qps"] == "inf" and rows[2]["output_throughput"] == ""

    from graphwise.bench import plots

    pngs = plots.plot_sweep(ROWS, tmp_path, "title")
    assert [p.name for p in pngs] == ["throughput_vs_qps.png", "ttft_vs_qps.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake(*extra):
    return [sys.executable, str(FAKE_SERVER_SCRIPT), "--port", "{port}", *extra]


def test_server_process_starts_and_stops(tmp_path):
    pid_file = tmp_path / "pids"
    server = sweep.ServerProcess(
        [],
        tmp_path / "log",
        command=_fake("--ignore-sigterm", "--spawn-child", "--pid-file", str(pid_file)),
        shutdown_grace_s=1.0,
    )
    with server:
        server.wait_ready(30)
        assert server.alive()
        import httpx

        assert httpx.get(server.base_url + "/health", trust_env=False).status_code == 200
        start = time.monotonic()
    assert time.monotonic() - start < 15
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 5
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids), "a server process survived stop()"
    assert not sweep._LIVE


def test_server_that_dies_reports_its_log(tmp_path):
    server = sweep.ServerProcess([], tmp_path / "log", command=_fake("--exit-code", "3"))
    with server, pytest.raises(sweep.ServerError, match="exited with code 3") as info:
        server.wait_ready(30)
    assert "fatal error on purpose" in str(info.value)


def test_server_that_never_gets_ready_times_out(tmp_path):
    server = sweep.ServerProcess(
        [], tmp_path / "log", command=_fake("--startup-delay", "60"), shutdown_grace_s=2.0
    )
    with server, pytest.raises(sweep.ServerError, match="not ready within"):
        server.wait_ready(1.5)
    assert not server.alive()


def test_sweep_end_to_end_with_fake_servers(tmp_path, monkeypatch, tokenizer):
    """The whole sweep flow, with fake servers in place of `graphwise serve`."""
    monkeypatch.setattr(
        sweep,
        "server_command",
        lambda args, host, port: [sys.executable, str(FAKE_SERVER_SCRIPT), "--port", str(port)],
    )
    cfg_file = tmp_path / "s.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "name": "fake sweep",
                "server": {"startup_timeout_s": 30, "shutdown_grace_s": 2},
                "bench": {
                    "dataset": "random",
                    "random_input_len": 16,
                    "random_output_len": 4,
                    "num_prompts": 6,
                    "request_rates": [20, "inf"],
                },
                "setups": [
                    {"name": "g-on", "cuda_graph": "on"},
                    {"name": "g-off", "cuda_graph": "off"},
                ],
            }
        )
    )
    args = argparse.Namespace(
        config=str(cfg_file),
        output_dir=str(tmp_path / "out"),
        fail_fast=False,
        dry_run=False,
        disable_tqdm=True,
    )
    assert sweep.run(args) == 0
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    for expected in (
        "sweep.md",
        "sweep.csv",
        "sweep.json",
        "throughput_vs_qps.png",
        "ttft_vs_qps.png",
        "g-on-qps20.json",
        "g-on-qpsinf.json",
        "g-off-qps20.json",
        "g-off-qpsinf.json",
        "g-on-server.log",
    ):
        assert expected in names, expected
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["setup"], r["qps"], r["completed"]) for r in rows] == [
        ("g-on", "20", "6"),
        ("g-on", "inf", "6"),
        ("g-off", "20", "6"),
        ("g-off", "inf", "6"),
    ]
    assert not sweep._LIVE


def test_interrupted_sweep_stops_servers_and_keeps_finished_runs(tmp_path, monkeypatch, tokenizer):
    pid_file = tmp_path / "pids"
    monkeypatch.setattr(
        sweep,
        "server_command",
        lambda args, host, port: [
            *(sys.executable, str(FAKE_SERVER_SCRIPT), "--port", str(port)),
            *("--spawn-child", "--pid-file", str(pid_file)),
        ],
    )
    calls = []
    real_execute = sweep.bench_serve.execute

    def execute(args):
        calls.append(args.request_rate)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second run
        return real_execute(args)

    monkeypatch.setattr(sweep.bench_serve, "execute", execute)
    config = sweep.parse_config(
        {
            "server": {"shutdown_grace_s": 2},
            "bench": {
                "dataset": "random",
                "random_input_len": 8,
                "random_output_len": 2,
                "num_prompts": 2,
                "request_rates": ["inf", 5],
            },
            "setups": [{"name": "one"}, {"name": "two"}],
        }
    )
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(config, tmp_path / "out", disable_tqdm=True)
    assert calls == [math.inf, 5.0]  # the second setup never started
    rows = list(csv.DictReader((tmp_path / "out" / "sweep.csv").open()))
    assert [(r["setup"], r["qps"]) for r in rows] == [("one", "inf")]
    pids = [int(p) for p in pid_file.read_text().split()]
    deadline = time.monotonic() + 5
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(pids) == 2 and all(_gone(p) for p in pids)
    assert not sweep._LIVE
