"""`graphwise explain`: trace analysis, the step-time model and verdicts (pure), the report schema,
and a whole run on CPU against a tiny model."""

from __future__ import annotations

import json

import pytest

from graphwise.insight.explain import (
    REPORT_SCHEMA,
    SCHEMA_VERSION,
    annotation,
    parse_trace,
    step_model,
    validate_report,
    verdict,
)


# ---- trace analysis ---------------------------------------------------------------------
def _x(cat, name, ts, dur, corr=None):
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1}
    if corr is not None:
        e["args"] = {"correlation": corr, "External id": corr}
    return e


def _synthetic_trace():
    """An eager step (3 launches, overlapping kernels, a memcpy, an emulation spin) and a graph
    step (one graph launch whose 4 kernels share its correlation id), both Kineto-shaped."""
    eager, graph = annotation("eager"), annotation("graph")
    return [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "python"}},
        _x("cpu_op", "aten::mm", 5, 1),  # before any step: ignored
        _x("kernel", "warmup_kernel", 6, 1, corr=1),  # launched before any step: ignored
        _x("user_annotation", eager, 100, 50),
        _x("cpu_op", "aten::linear", 101, 10),
        _x("cpu_op", "aten::mm", 102, 8),
        _x("cuda_runtime", "cudaLaunchKernel", 103, 4, corr=10),
        _x("cuda_driver", "cuLaunchKernel", 110, 6, corr=11),  # a Triton kernel
        _x("cuda_runtime", "cudaMemcpyAsync", 120, 3, corr=12),
        _x("cuda_runtime", "cudaLaunchKernel_v7000", 130, 2, corr=13),
        _x("cuda_runtime", "cudaStreamSynchronize", 160, 1, corr=14),  # after the window
        _x("kernel", "gemv", 105, 20, corr=10),
        _x("kernel", "rmsnorm", 120, 10, corr=11),  # overlaps gemv by 5 us
        _x("gpu_memcpy", "Memcpy DtoD", 140, 5, corr=12),
        _x("kernel", "spin_kernel", 150, 30, corr=13),
        _x("user_annotation", graph, 300, 20),
        _x("cuda_runtime", "cudaMemcpyAsync", 302, 2, corr=20),
        _x("cuda_runtime", "cudaGraphLaunch", 305, 10, corr=21),
        _x("gpu_memcpy", "Memcpy HtoD", 304, 1, corr=20),
        _x("kernel", "k0", 310, 5, corr=21),
        _x("kernel", "k1", 315, 5, corr=21),
        _x("kernel", "k2", 320, 5, corr=21),
        _x("kernel", "k3", 330, 5, corr=21),
        _x("kernel", "void gemm<128, 64>(float*, int)", 336, 3, corr=21),
        _x("kernel", "void gemm<64, 32>(float*, int)", 339, 4, corr=21),
        _x("kernel", "late_uncorrelated", 340, 2),  # no correlation: the last step started
    ]


def test_parse_trace_attributes_gpu_work_to_steps():
    out = parse_trace(_synthetic_trace(), [annotation("eager"), annotation("graph")])
    e, g = out[annotation("eager")], out[annotation("graph")]
    assert e["kernels"] == 2 and e["emulation_kernels"] == 1 and e["memcpy_memset"] == 1
    # gemv 105-125 and rmsnorm 120-130 overlap: 25 us; memcpy 5; spin 30
    assert e["gpu_busy_ms"] == pytest.approx(0.060)
    assert e["gpu_span_ms"] == pytest.approx((180 - 105) / 1e3)
    assert e["launch_api_calls"] == 3
    assert e["launch_api_mean_us"] == pytest.approx((4 + 6 + 2) / 3)
    assert e["graph_launches"] == 0 and e["torch_ops"] == 2
    assert e["host_ms"] == pytest.approx(0.050)
    assert g["kernels"] == 7  # six from the graph, one matched by time
    assert g["graph_launches"] == 1 and g["launch_api_calls"] == 0
    assert g["launch_api_mean_us"] is None
    assert g["gpu_busy_ms"] == pytest.approx((1 + 15 + 5 + 7) / 1e3)  # late one inside gemm
    # kernel families: template arguments and parameters dropped, largest first
    top = g["top_kernels"]
    assert top[0] == {"kernel": "void gemm", "ms": pytest.approx(0.007), "count": 2}
    assert {t["kernel"] for t in top} == {"void gemm", "k0", "k1", "k2", "k3", "late_uncorrelated"}
    assert [t["kernel"] for t in e["top_kernels"]] == ["gemv", "rmsnorm"]  # not the spin


def test_parse_trace_of_a_cpu_only_profile():
    trace = [
        _x("user_annotation", annotation("eager"), 0, 100),
        _x("cpu_op", "aten::linear", 1, 10),
        _x("cpu_op", "aten::addmm", 2, 8),
    ]
    out = parse_trace(trace, [annotation("eager"), annotation("graph")])
    assert set(out) == {annotation("eager")}  # no graph step was recorded
    e = out[annotation("eager")]
    assert e["torch_ops"] == 2 and e["kernels"] == 0 and e["gpu_busy_ms"] == 0.0


# ---- the step-time model and the verdict ---------------------------------------------------
@pytest.mark.parametrize(
    "enqueue, eager_busy, graph_busy, replay, sync, eager_ms, graph_ms",
    [
        (13.0, 5.6, 5.5, 0.2, 0.05, 13.05, 5.75),  # launch-bound (H100-like)
        (13.0, 15.0, 14.9, 0.2, 0.05, 15.05, 15.15),  # GPU-bound (4090-like)
        (13.0, 5.6, None, None, None, 13.0, None),  # no graph
        (None, None, None, None, None, None, None),  # CPU
    ],
)
def test_step_model(enqueue, eager_busy, graph_busy, replay, sync, eager_ms, graph_ms):
    m = step_model(enqueue, eager_busy, graph_busy, replay, sync)
    assert m["eager_ms"] == pytest.approx(eager_ms) if eager_ms else m["eager_ms"] is None
    assert m["graph_ms"] == pytest.approx(graph_ms) if graph_ms else m["graph_ms"] is None
    if eager_ms and graph_ms:
        assert m["speedup"] == pytest.approx(eager_ms / graph_ms)
    else:
        assert m["speedup"] is None


@pytest.mark.parametrize(
    "enqueue, busy, measured, model, unavailable, choice, bound, words",
    [
        (
            23.1,
            9.4,
            2.3,
            2.4,
            None,
            "graph",
            "launch",
            ["launch-bound", "23.1 ms > GPU busy 9.4 ms", "-> graph"],
        ),
        (13.0, 15.8, 1.0, 0.99, None, "eager", "gpu", ["GPU-bound", "-> eager", "measured 1.00x"]),
        (13.0, 15.8, 1.2, 0.99, None, "graph", "gpu", ["still remove", "disagree"]),
        (13.0, 5.0, 1.02, 2.5, None, "eager", "launch", ["yet replay did not pay", "disagree"]),
        (
            None,
            None,
            None,
            None,
            "CUDA graphs are unavailable on CPU",
            "eager",
            None,
            ["unavailable on CPU"],
        ),
        (13.0, 5.0, None, 2.0, None, "graph", "launch", ["model 2.00x"]),
    ],
)
def test_verdict(enqueue, busy, measured, model, unavailable, choice, bound, words):
    got_choice, got_bound, reason = verdict(enqueue, busy, measured, model, 1.05, unavailable)
    assert (got_choice, got_bound) == (choice, bound)
    for w in words:
        assert w in reason, (w, reason)


# ---- the report schema -----------------------------------------------------------------------
def _mode(**over):
    m = {
        "step_ms": 14.4,
        "step_ms_p90": 15.0,
        "engine_step_ms": 15.1,
        "cpu_enqueue_ms": 13.0,
        "replay_ms": None,
        "gpu_busy_ms": 5.6,
        "gpu_idle_share": 0.61,
        "kernels": 1254,
        "emulation_kernels": 0,
        "launch_api_calls": 1254,
        "launch_api_mean_us": 4.1,
        "graph_launches": 0,
        "torch_ops": 4000,
        "top_kernels": [{"kernel": "gemv", "ms": 4.1, "count": 196}],
    }
    m.update(over)
    return m


def _report():
    return {
        "schema": SCHEMA_VERSION,
        "model": "qwen2.5-7b",
        "num_layers": 28,
        "dtype": "bfloat16",
        "device": "cuda",
        "environment": {"device_name": "H100"},
        "settings": {
            "batch_sizes": [1],
            "context_len": 256,
            "steps": 20,
            "warmup_steps": 3,
            "engine_steps": 8,
            "min_speedup": 1.05,
            "emulate_bandwidth_bytes_per_s": None,
            "nvtx": False,
            "attention_backend": "triton",
        },
        "copy_bandwidth_bytes_per_s": 3.02e12,
        "weights_bytes": 15_230_000_000,
        "kv_bytes_per_token": 57344,
        "kv_cache_dtype": "bfloat16",
        "sync_ms": 0.03,
        "graphs_available": True,
        "graphs_unavailable_reason": None,
        "capture": {"buckets": [1], "seconds": 0.2, "pool_bytes": 1 << 20, "failed": {}},
        "memory": {"num_blocks": 10},
        "rows": [
            {
                "batch_size": 1,
                "context_len": 256,
                "bytes_per_step": 15_245_000_000,
                "floor_ms": 5.05,
                "eager": _mode(),
                "graph": _mode(step_ms=6.4, replay_ms=0.1, graph_launches=1),
                "model": {"eager_ms": 13.05, "graph_ms": 5.75, "speedup": 2.27},
                "measured_speedup": 2.25,
                "bound": "launch",
                "verdict": "graph",
                "reason": "launch-bound: ...",
                "trace": "trace-bs1.json",
            }
        ],
        "files": {"json": "explain.json", "plot": "explain.png", "traces": ["trace-bs1.json"]},
        "date": "2026-01-01T00:00:00",
    }


def test_a_conforming_report_validates():
    assert validate_report(_report()) == []


def test_schema_violations_are_reported():
    r = _report()
    del r["sync_ms"]
    r["extra"] = 1
    r["rows"][0]["eager"]["kernels"] = 12.5
    r["rows"][0]["verdict"] = None
    r["settings"]["nvtx"] = 1
    r["graphs_available"] = 1
    errors = validate_report(r)
    assert "report.sync_ms: missing" in errors
    assert "report.extra: not in the schema" in errors
    assert any(e.startswith("report.rows[0].eager.kernels") for e in errors)
    assert any(e.startswith("report.rows[0].verdict") for e in errors)
    assert any(e.startswith("report.settings.nvtx") for e in errors)
    assert any(e.startswith("report.graphs_available") for e in errors)
    assert len(errors) == 6


def test_bool_is_not_a_number_and_nullable_objects_accept_null():
    r = _report()
    r["rows"][0]["graph"] = None
    r["capture"] = None
    assert validate_report(r) == []
    r["rows"][0]["floor_ms"] = True
    assert validate_report(r) == [
        "report.rows[0].floor_ms: expected (<class 'int'>, <class 'float'>), got bool"
    ]


def test_schema_lists_the_documented_row_columns():
    row = REPORT_SCHEMA["rows"][0]
    for key in ("eager", "graph", "model", "measured_speedup", "bound", "verdict", "reason"):
        assert key in row
    mode = row["eager"]
    for key in (
        "kernels",
        "cpu_enqueue_ms",
        "gpu_busy_ms",
        "gpu_idle_share",
        "launch_api_mean_us",
        "step_ms",
    ):
        assert key in mode


# ---- a whole run on CPU ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_run(tiny_model_dir, tmp_path_factory):
    from graphwise.cli import main

    out = tmp_path_factory.mktemp("explain")
    rc = main(
        [
            "explain",
            "--model",
            str(tiny_model_dir("llama")),
            "--device",
            "cpu",
            "--batch-sizes",
            "2,1",
            "--context-len",
            "12",
            "--steps",
            "3",
            "--warmup-steps",
            "1",
            "--engine-steps",
            "2",
            "--output-dir",
            str(out),
        ]
    )
    return rc, out


def test_cpu_run_writes_a_valid_report(cpu_run):
    rc, out = cpu_run
    assert rc == 0
    report = json.loads((out / "explain.json").read_text())
    assert validate_report(report) == []
    assert report["schema"] == SCHEMA_VERSION and report["device"] == "cpu"
    assert report["settings"]["batch_sizes"] == [1, 2]
    assert not report["graphs_available"] and report["capture"] is None
    assert "unavailable on CPU" in report["graphs_unavailable_reason"]
    assert [r["batch_size"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["graph"] is None and row["measured_speedup"] is None
        assert row["verdict"] == "eager" and "unavailable on CPU" in row["reason"]
        e = row["eager"]
        assert e["step_ms"] > 0 and e["cpu_enqueue_ms"] > 0 and e["engine_step_ms"] > 0
        for gpu_only in ("gpu_busy_ms", "gpu_idle_share", "kernels", "launch_api_mean_us"):
            assert e[gpu_only] is None
        assert e["torch_ops"] > 0  # the CPU profile did record the step
        assert row["model"] == {"eager_ms": None, "graph_ms": None, "speedup": None}
        assert row["floor_ms"] > 0 and row["bytes_per_step"] > report["weights_bytes"]


def test_cpu_run_writes_the_plot_and_traces(cpu_run):
    _, out = cpu_run
    report = json.loads((out / "explain.json").read_text())
    png = out / report["files"]["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["files"]["traces"] == ["trace-bs1.json", "trace-bs2.json"]
    for name in report["files"]["traces"]:
        trace = json.loads((out / name).read_text())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert annotation("eager") in names


def test_emulated_bandwidth_needs_cuda(tiny_model_dir, tmp_path, capsys):
    from graphwise.cli import main

    rc = main(
        [
            "explain",
            "--model",
            str(tiny_model_dir("llama")),
            "--device",
            "cpu",
            "--batch-sizes",
            "1",
            "--context-len",
            "4",
            "--steps",
            "1",
            "--engine-steps",
            "0",
            "--emulate-bandwidth",
            "1e12",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert rc == 2 and "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("sizes", ["0,1", "a", ""])
def test_bad_batch_sizes_are_rejected(sizes, capsys):
    from graphwise.cli import main

    assert main(["explain", "--batch-sizes", sizes, "--device", "cpu"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err


def test_console_table_has_a_row_and_a_reason_per_batch():
    from graphwise.insight.explain import format_report

    text = format_report(_report())
    lines = text.splitlines()
    assert "H100" in lines[0] and "3.02 TB/s" in lines[0]
    row = next(line for line in lines if line.strip().startswith("1 "))
    for value in ("1254", "13.00", "5.60", "61", "14.40", "6.40", "2.27", "2.25", "graph"):
        assert value in row, (value, row)
    assert lines[-2] == "batch 1: launch-bound: ..."
    assert lines[-1] == "  GPU ms by kernel (graph): gemv 4.10"
