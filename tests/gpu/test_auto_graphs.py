"""On a GPU: cuda_graph="auto" keeps graphs where they are faster, gives released graph memory to
the KV pool, survives a failed capture, decides within its time bound on a 7B model; explain
profiles real steps (kernels, GPU busy, graph launches, emulated bandwidth)."""

from __future__ import annotations

import gc
import json
import random

import pytest
import torch

from graphwise import LLM, SamplingParams

pytestmark = pytest.mark.gpu
MiB = 1 << 20


def _free() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _clean_memory():
    _free()
    yield
    _free()


def _prompts(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(20)]} for _ in range(n)]


def test_auto_keeps_the_graphs_that_are_faster():
    llm = LLM(
        preset="qwen2.5-7b",
        num_layers=8,
        max_model_len=1024,
        max_num_seqs=16,
        kv_cache_memory=1 << 30,
    )
    engine = llm.llm_engine
    plan = engine.graph_plan
    assert plan is not None and plan.mode == "auto"
    assert plan.candidates == [1, 2, 4, 8, 16]
    measured = {d.batch_size: d for d in plan.decisions if d.source == "measured"}
    assert {1, 16} <= set(measured), plan.decisions
    for d in measured.values():
        assert d.eager_ms > 0 and d.graph_ms > 0
        assert d.keep == (d.speedup >= plan.min_speedup)
    # an 8-layer 7B-shaped bf16 decode at batch 1 is launch-bound on an H100: its graph pays
    assert 1 in plan.kept, plan.decisions
    assert plan.pool_bytes is None  # the KV size was fixed: nothing to measure
    graphs = engine.executor.driver.graph_runner
    assert graphs is not None and sorted(graphs.graphs) == plan.kept
    assert set(plan.eager_buckets) <= set(graphs.eager_buckets)
    before = engine.get_stats().steps_graph
    outs = llm.generate(
        _prompts(1, engine.model_config.vocab_size),
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )
    assert len(outs[0].outputs[0].token_ids) == 8
    assert engine.get_stats().steps_graph - before >= 6  # batch 1 decodes by replay
    del llm, engine, graphs


def test_released_graph_memory_goes_to_the_kv_pool():
    def build(**kw):
        return LLM(
            preset="qwen2.5-7b",
            num_layers=4,
            max_model_len=1024,
            max_num_seqs=32,
            gpu_memory_utilization=0.6,
            **kw,
        )

    on = build(cuda_graph="on")
    plan_on = on.llm_engine.memory_plan
    graphs_on = on.llm_engine.graph_plan
    assert graphs_on is not None and graphs_on.mode == "on"
    assert plan_on.graph_pool_source == "measured" and plan_on.graph_pool_bytes > 0
    # the pool measured before sizing predicts what the real capture took
    captured = graphs_on.captured_pool_bytes
    assert captured is not None
    assert abs(captured - plan_on.graph_pool_bytes) <= 64 * MiB + 0.25 * plan_on.graph_pool_bytes
    blocks_on, pool_on = plan_on.num_blocks, plan_on.graph_pool_bytes
    del on, plan_on, graphs_on
    _free()

    auto = build(cuda_graph="auto", cuda_graph_min_speedup=1000.0)  # no graph is that much faster
    engine = auto.llm_engine
    assert engine.graph_plan.kept == [] and engine.executor.driver.graph_runner is None
    plan = engine.memory_plan
    assert plan.graph_pool_bytes == 0 and plan.graph_pool_source == "measured"
    assert plan.graph_pool_all_bytes > 0 and plan.kv_tokens_gained > 0
    gained = (plan.num_blocks - blocks_on) * plan.block_bytes
    print(f"pool of every graph {pool_on / MiB:.1f} MiB; KV gained {gained / MiB:.1f} MiB")
    assert gained >= 0.5 * pool_on - 32 * MiB, (gained, pool_on)
    del auto, engine


def test_a_failed_capture_falls_back_to_eager(monkeypatch):
    from graphwise.runner import cuda_graph

    real = cuda_graph.CudaGraphRunner.capture

    def flaky(self, bs, warmup=2):
        if bs == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, bs, warmup)

    monkeypatch.setattr(cuda_graph.CudaGraphRunner, "capture", flaky)
    llm = LLM(
        preset="qwen2.5-7b",
        num_layers=2,
        max_model_len=512,
        max_num_seqs=8,
        kv_cache_memory=1 << 30,
        cuda_graph_min_speedup=0.01,  # keep every graph that captures
    )
    engine = llm.llm_engine
    by_bs = {d.batch_size: d for d in engine.graph_plan.decisions}
    assert by_bs[4].source == "failed" and not by_bs[4].keep
    assert "out of memory" in by_bs[4].reason
    graphs = engine.executor.driver.graph_runner
    assert graphs is not None and 4 not in graphs.graphs
    assert graphs.bucket_for(3) is None and graphs.bucket_for(4) is None  # eager, not padded to 8
    assert graphs.bucket_for(1) == 1 and graphs.bucket_for(8) == 8
    outs = llm.generate(
        _prompts(3, engine.model_config.vocab_size),
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
        use_tqdm=False,
    )
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    del llm, engine, graphs


def test_the_decision_is_bounded_for_a_7b_model():
    from graphwise.runner.graph_policy import TIMING_BUDGET_S

    llm = LLM(preset="qwen2.5-7b", max_model_len=4096)  # 28 layers, 35 buckets (1..256)
    engine = llm.llm_engine
    plan = engine.graph_plan
    print(json.dumps({k: v for k, v in plan.as_dict().items() if k != "decisions"}, default=str))
    assert len(plan.candidates) == 35
    assert plan.seconds <= 10.0, plan.seconds
    assert plan.timing_seconds <= TIMING_BUDGET_S + 1.5
    assert 1 in plan.kept  # launch-bound at batch 1 on an H100
    assert plan.pool_bytes is not None and plan.pool_all_bytes >= plan.pool_bytes
    mp = engine.memory_plan
    assert mp.graph_pool_source == "measured" and mp.kv_tokens > 0
    del llm, engine


def _explain(tmp_path, *extra):
    from graphwise.cli import main

    rc = main(
        [
            "explain",
            "--preset",
            "qwen2.5-7b",
            "--num-layers",
            "4",
            "--batch-sizes",
            "1,8",
            "--context-len",
            "64",
            "--steps",
            "5",
            "--engine-steps",
            "3",
            "--output-dir",
            str(tmp_path),
            *extra,
        ]
    )
    assert rc == 0
    return json.loads((tmp_path / "explain.json").read_text())


def test_explain_profiles_real_steps(tmp_path):
    from graphwise.insight.explain import validate_report

    report = _explain(tmp_path)
    assert validate_report(report) == []
    assert report["graphs_available"] and report["capture"]["buckets"] == [1, 8]
    for row in report["rows"]:
        e, g = row["eager"], row["graph"]
        assert g is not None, row
        assert e["kernels"] > 20 and e["launch_api_calls"] > 20, e
        assert e["launch_api_mean_us"] > 0 and 0 < e["gpu_busy_ms"] <= e["step_ms"] * 1.2
        assert 0 <= e["gpu_idle_share"] < 1
        assert g["graph_launches"] >= 1, g
        # the graph's kernels are attributed to the graph step (by correlation or time)
        assert g["kernels"] >= 0.5 * e["kernels"], (e["kernels"], g["kernels"])
        assert g["replay_ms"] is not None and g["replay_ms"] < e["cpu_enqueue_ms"]
        assert row["measured_speedup"] > 0 and row["model"]["speedup"] > 0
        assert e["engine_step_ms"] > 0 and g["engine_step_ms"] > 0
        assert row["bound"] in ("launch", "gpu") and row["verdict"] in ("graph", "eager")
        trace = json.loads((tmp_path / row["trace"]).read_text())
        assert any(ev.get("cat") == "kernel" for ev in trace["traceEvents"])
    assert (tmp_path / "explain.png").stat().st_size > 1000


def test_explain_with_emulated_bandwidth_adds_gpu_time(tmp_path):
    report = _explain(tmp_path, "--emulate-bandwidth", "1.0e12")
    assert report["settings"]["emulate_bandwidth_bytes_per_s"] == 1.0e12
    copy = report["copy_bandwidth_bytes_per_s"]
    embed = 152064 * 3584 * 2  # not emulated (read a row per token)
    extra_ms = (report["weights_bytes"] - embed) * (1 / 1.0e12 - 1 / copy) * 1e3
    for row in report["rows"]:
        e, g = row["eager"], row["graph"]
        assert e["emulation_kernels"] == 4 + 1 and g["emulation_kernels"] == 4 + 1
        assert e["gpu_busy_ms"] >= 0.7 * extra_ms, (e["gpu_busy_ms"], extra_ms)
        assert g["gpu_busy_ms"] >= 0.7 * extra_ms
        assert row["floor_ms"] == pytest.approx(row["bytes_per_step"] / 1.0e12 * 1e3)
