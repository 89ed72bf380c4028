"""The auto CUDA-graph policy: which buckets keep a graph, given measured timings (pure), how the
graph runner treats released buckets, and that auto means eager on CPU."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from graphwise.config import RunnerLimits
from graphwise.runner.cuda_graph import CudaGraphRunner, capture_sizes
from graphwise.runner.graph_decision import (
    BucketDecision,
    BucketTiming,
    decide_buckets,
    format_decision_table,
    initial_probes,
    next_refinement,
    run_policy,
)
from graphwise.runner.graph_policy import GraphPlan, plan_cuda_graphs

T = BucketTiming


def _by_bs(decisions: list[BucketDecision]) -> dict[int, BucketDecision]:
    return {d.batch_size: d for d in decisions}


# ---- initial probes ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "max_bs, expected",
    [
        (1, [1]),
        (2, [1, 2]),
        (8, [1, 8, 2, 4]),
        (20, [1, 20, 4, 2, 8, 16]),
        (256, [1, 256, 16, 4, 64, 2, 8, 32, 128]),
    ],
)
def test_initial_probes_are_powers_of_two_and_the_ends_in_bisection_order(max_bs, expected):
    assert initial_probes(capture_sizes(max_bs)) == expected


def test_initial_probes_of_nothing():
    assert initial_probes([]) == []


# ---- the decision table -------------------------------------------------------------------
# (timings {bs: (eager_ms, graph_ms) | "error"}, min_speedup, expected {bs: (keep, source)})
CASES = [
    pytest.param(
        {1: (14.4, 6.4), 8: (12.9, 6.7), 32: (12.9, 7.3), 64: (14.3, 7.6)},
        1.05,
        {
            1: (True, "measured"),
            8: (True, "measured"),
            32: (True, "measured"),
            64: (True, "measured"),
        },
        id="h100-7b-all-kept",
    ),
    pytest.param(
        {1: (15.8, 15.8), 8: (16.0, 15.9)},
        1.05,
        {1: (False, "measured"), 8: (False, "measured")},
        id="4090-like-none-kept",
    ),
    pytest.param(
        {1: (10.5, 10.0), 2: (10.49, 10.0)},
        1.05,
        {1: (True, "measured"), 2: (False, "measured")},
        id="threshold-is-inclusive",
    ),
    pytest.param(
        {1: (5.0, 2.0), 4: "capture failed: CUDA out of memory", 8: (5.0, 4.0)},
        1.05,
        {1: (True, "measured"), 4: (False, "failed"), 8: (True, "measured")},
        id="failed-capture-is-eager",
    ),
    pytest.param(
        {1: (5.0, 2.0), 8: (5.0, 4.0)},
        2.0,
        {
            1: (True, "measured"),
            2: (True, "interpolated"),
            4: (False, "interpolated"),
            8: (False, "measured"),
        },
        id="interpolated-between-measured",
    ),
    pytest.param(
        {2: (6.0, 3.0)},
        1.05,
        {1: (True, "extrapolated"), 2: (True, "measured"), 4: (True, "extrapolated")},
        id="extrapolated-from-the-one-measured",
    ),
    pytest.param(
        {},
        1.05,
        {1: (False, "unmeasured"), 2: (False, "unmeasured")},
        id="nothing-measured-means-eager",
    ),
    pytest.param(
        {1: (float("nan"), 2.0), 2: (0.0, 1.0), 4: (3.0, 1.0)},
        1.05,
        {1: (True, "extrapolated"), 2: (True, "extrapolated"), 4: (True, "measured")},
        id="invalid-timings-count-as-unmeasured",
    ),
]


@pytest.mark.parametrize("timings, min_speedup, expected", CASES)
def test_decide_buckets(timings, min_speedup, expected):
    t = {
        bs: T(bs, error=v) if isinstance(v, str) else T(bs, eager_ms=v[0], graph_ms=v[1])
        for bs, v in timings.items()
    }
    decisions = _by_bs(decide_buckets(expected.keys(), t, min_speedup))
    assert sorted(decisions) == sorted(expected)
    for bs, (keep, source) in expected.items():
        d = decisions[bs]
        assert (d.keep, d.source) == (keep, source), (bs, d)
        if d.speedup is not None:
            assert d.speedup == pytest.approx(d.eager_ms / d.graph_ms)
            assert math.isfinite(d.speedup)


def test_interpolation_is_linear_in_batch_size():
    t = {1: T(1, 10.0, 5.0), 9: T(9, 18.0, 9.0)}
    d = _by_bs(decide_buckets([1, 5, 9], t, 1.05))[5]
    assert d.eager_ms == pytest.approx(14.0) and d.graph_ms == pytest.approx(7.0)
    assert d.speedup == pytest.approx(2.0) and d.keep


def test_decision_reason_and_table_show_the_numbers():
    t = {1: T(1, 14.4, 6.4), 2: T(2, error="capture failed: CUDA out of memory")}
    decisions = decide_buckets([1, 2, 4], t, 1.05)
    d1 = _by_bs(decisions)[1]
    assert "14.40" in d1.reason and "6.40" in d1.reason and "2.25x" in d1.reason
    table = format_decision_table(decisions, 1.05)
    lines = table.splitlines()
    assert len(lines) == 4 and "eager ms" in lines[0]
    assert "keep" in lines[1] and "2.25x" in lines[1]
    assert "release" in lines[2] and "out of memory" in lines[2]
    assert "extrapolated" in lines[3]


# ---- refinement -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "keeps, expected",
    [
        ({1: True, 16: True}, None),  # neighbours agree
        ({1: True, 16: False}, 4),  # middle of 2, 4, 8
        ({1: True, 2: False}, None),  # nothing between
        ({1: True, 2: True, 8: False, 16: False}, 4),
    ],
)
def test_next_refinement_bisects_between_disagreeing_neighbours(keeps, expected):
    candidates = [1, 2, 4, 8, 16]
    timings = {bs: T(bs, 2.0, 1.0) if keep else T(bs, 1.0, 1.0) for bs, keep in keeps.items()}
    decisions = decide_buckets(candidates, timings, 1.05)
    assert next_refinement(candidates, decisions) == expected


def test_failed_buckets_count_as_known_for_refinement():
    candidates = [1, 2, 4, 8, 16]
    timings = {1: T(1, 2.0, 1.0), 16: T(16, error="capture failed: x")}
    decisions = decide_buckets(candidates, timings, 1.05)
    assert next_refinement(candidates, decisions) == 4


# ---- the whole loop with a fake measurement --------------------------------------------------
def _fake_measure(speedup_of, calls):
    def measure(bs):
        calls.append(bs)
        return T(bs, eager_ms=10.0 * speedup_of(bs), graph_ms=10.0)

    return measure


def test_run_policy_finds_the_crossover_with_few_measurements():
    candidates = capture_sizes(256)  # 35 buckets
    calls: list[int] = []
    # graphs pay up to batch 100 and stop paying beyond (a 4090-like crossover)
    timings, decisions = run_policy(
        candidates, _fake_measure(lambda bs: 1.5 if bs <= 100 else 1.0, calls), 1.05
    )
    kept = [d.batch_size for d in decisions if d.keep]
    assert kept == [b for b in candidates if b <= 100]
    assert len(calls) == len(set(calls)) <= 9 + 6  # probes + a bisection, never all 35
    assert {104, 96} <= set(calls)  # the neighbours at the crossover were measured


def test_run_policy_measures_only_the_probes_when_all_agree():
    candidates = capture_sizes(64)
    calls: list[int] = []
    _, decisions = run_policy(candidates, _fake_measure(lambda bs: 2.0, calls), 1.05)
    assert sorted(calls) == [1, 2, 4, 8, 16, 32, 64]
    assert all(d.keep for d in decisions)
    assert {d.source for d in decisions} == {"measured", "interpolated"}


def test_run_policy_stops_when_out_of_time_but_after_one_valid_measurement():
    candidates = capture_sizes(64)
    calls: list[int] = []
    _, decisions = run_policy(candidates, _fake_measure(lambda bs: 2.0, calls), 1.05, lambda: True)
    assert calls == [1]
    assert all(d.keep for d in decisions)  # extrapolated from batch 1


def test_run_policy_survives_failures():
    candidates = [1, 2, 4, 8]
    calls: list[int] = []

    def measure(bs):
        calls.append(bs)
        if bs == 8:
            return T(bs, error="capture failed: CUDA out of memory")
        return T(bs, 2.0, 1.0)

    _, decisions = run_policy(candidates, measure, 1.05)
    by = _by_bs(decisions)
    assert by[8].source == "failed" and not by[8].keep
    assert all(by[b].keep for b in (1, 2, 4))


# ---- the graph runner honours released buckets (no GPU needed to build one) ------------------
def _fake_runner(parallel=None):
    from graphwise.distributed.parallel_state import SINGLE
    from graphwise.layers.attention.torch_backend import TorchAttentionBackend

    mc = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    return SimpleNamespace(
        block_size=16,
        device=torch.device("cpu"),
        dtype=torch.float32,
        model_config=mc,
        backend=TorchAttentionBackend(scratch_slot=0),
        parallel=parallel or SINGLE,
    )


def _graph_runner(buckets, eager=None):
    from graphwise.config import EngineConfig

    cfg = EngineConfig(max_num_seqs=max(buckets))
    return CudaGraphRunner(_fake_runner(), cfg, 256, buckets=buckets, eager_buckets=eager)


@pytest.mark.parametrize(
    "buckets, eager, expected",
    [
        ([1, 2, 4, 8], None, {1: 1, 2: 2, 3: 4, 5: 8, 8: 8, 9: None}),
        # 4 released: 3 and 4 run eagerly instead of padding up to 8
        ([1, 2, 8], [4], {1: 1, 2: 2, 3: None, 4: None, 5: 8, 8: 8, 9: None}),
        # everything above 2 released
        ([1, 2], [4, 8], {2: 2, 3: None, 8: None}),
    ],
)
def test_bucket_for_never_pads_past_a_released_bucket(buckets, eager, expected):
    runner = _graph_runner(buckets, eager)
    for n, bucket in expected.items():
        assert runner.bucket_for(n) == bucket, n


def test_release_turns_buckets_eager():
    runner = _graph_runner([1, 2, 4, 8])
    runner.graphs = {b: object() for b in (1, 2, 4, 8)}
    runner.outputs = {b: torch.zeros(1) for b in (1, 2, 4, 8)}
    runner.release({1, 8})
    assert runner.buckets == [1, 8] and runner.eager_buckets == [2, 4]
    assert runner.bucket_for(1) == 1
    assert runner.bucket_for(2) is None and runner.bucket_for(4) is None
    assert runner.bucket_for(5) == 8


# ---- CPU: auto means eager ---------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_engine(tiny_model_dir):
    from graphwise.config import EngineConfig
    from graphwise.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(tiny_model_dir("llama")), device="cpu", max_num_seqs=4))


def test_auto_on_cpu_falls_back_to_eager(tiny_model_dir, caplog):
    from graphwise.config import EngineConfig
    from graphwise.engine.engine import LLMEngine
    from graphwise.sampling_params import SamplingParams

    with caplog.at_level(logging.INFO, logger="graphwise.engine.engine"):
        engine = LLMEngine(
            EngineConfig(model=str(tiny_model_dir("llama")), device="cpu", max_num_seqs=4)
        )
    assert engine.config.cuda_graph == "auto"
    assert engine.graph_plan is None and engine.executor.driver.graph_runner is None
    said = [r.getMessage() for r in caplog.records if "cuda_graph=auto" in r.getMessage()]
    assert len(said) == 1 and "eager" in said[0]
    engine.add_request(None, SamplingParams(temperature=0, max_tokens=3), [1, 2, 3])
    while engine.has_unfinished_requests():
        engine.step()
    stats = engine.get_stats()
    assert stats.steps_graph == 0 and stats.steps_eager >= 3


def test_plan_cuda_graphs_is_none_without_cuda(cpu_engine):
    limits = RunnerLimits(cpu_engine.max_model_len, cpu_engine.max_num_batched_tokens)
    assert plan_cuda_graphs(cpu_engine.executor.driver, limits) is None


def test_graph_plan_as_dict_is_json_ready():
    import json

    plan = GraphPlan(
        mode="auto",
        candidates=[1, 2],
        kept=[1],
        eager_buckets=[2],
        decisions=decide_buckets([1, 2], {1: T(1, 2.0, 1.0), 2: T(2, 1.0, 1.0)}, 1.05),
    )
    data = json.loads(json.dumps(plan.as_dict()))
    assert data["kept"] == [1] and data["decisions"][0]["keep"] is True


def test_a_bucket_another_rank_failed_to_capture_is_dropped_here_too(monkeypatch):
    """Under tensor parallelism a graph replays only if every rank has it: one rank's failed
    capture (out of memory, say) releases the bucket on all."""
    from graphwise.distributed import parallel_state

    graphs = _graph_runner([1, 2])
    graphs.runner.is_driver = True

    def fake_capture(bs: int, warmup: int = 2) -> None:
        graphs.graphs[bs], graphs.outputs[bs] = object(), object()

    monkeypatch.setattr(graphs, "capture", fake_capture)
    monkeypatch.setattr(parallel_state, "agree_all", lambda v: [v, None])
    assert graphs.try_capture(1) is None and 1 in graphs.graphs
    monkeypatch.setattr(parallel_state, "agree_all", lambda v: [v, "capture failed: out of memory"])
    assert graphs.try_capture(2) == "capture failed: out of memory"
    assert 2 not in graphs.graphs and 2 in graphs.eager_buckets and 1 in graphs.graphs


def test_slowest_rank_combines_each_ranks_timing():
    from graphwise.runner.graph_decision import slowest_rank

    assert slowest_rank([T(8, 3.0, 1.0), T(8, 2.0, 1.5)]) == T(8, 3.0, 1.5)
    assert slowest_rank([T(8, 3.0, 1.0)]) == T(8, 3.0, 1.0)
    failed = slowest_rank([T(8, 3.0, 1.0), T(8, error="capture failed: OOM")])
    assert not failed.valid and failed.error == "rank 1: capture failed: OOM"
    assert slowest_rank([T(8, error="timing failed"), T(8, 1.0, 1.0)]).error == "timing failed"
    assert not slowest_rank([T(8, 3.0, 1.0), T(8, 3.0, None)]).valid
    with pytest.raises(ValueError, match="different buckets"):
        slowest_rank([T(8, 3.0, 1.0), T(16, 3.0, 1.0)])


def test_a_later_pipeline_stage_graph_takes_the_previous_stages_output():
    """Its graphs read the previous stage's (hidden, residual) from static buffers; stage 0's
    take token ids (the capture and replay themselves need a GPU: tests/gpu)."""
    from graphwise.config import EngineConfig
    from graphwise.distributed.parallel_state import ParallelContext

    cfg = EngineConfig(max_num_seqs=8)
    first = CudaGraphRunner(_fake_runner(ParallelContext(pp_rank=0, pp_size=2)), cfg, 256)
    later = CudaGraphRunner(_fake_runner(ParallelContext(pp_rank=1, pp_size=2)), cfg, 256)
    assert first.intermediate is None
    assert later.intermediate is not None and later.intermediate.shape == (2, 8, 8)
