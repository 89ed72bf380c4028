"""Memory arithmetic: the KV budget, the tokens gained by releasing graphs, and the plan (the CUDA
branch with the device queries faked, so it runs on CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from graphwise.config import EngineConfig, RunnerLimits
from graphwise.runner import memory
from graphwise.runner.graph_policy import GraphPlan
from graphwise.runner.memory import (
    GRAPH_RESERVE_BYTES,
    MemoryPlan,
    kv_budget_bytes,
    kv_tokens_gained,
    plan_kv_blocks,
)

GiB = 1 << 30
MiB = 1 << 20


@pytest.mark.parametrize(
    "total, util, used, act, graphs, expected",
    [
        (80 * GiB, 0.9, 16 * GiB, 2 * GiB, 512 * MiB, int(80 * GiB * 0.9) - 18 * GiB - 512 * MiB),
        (80 * GiB, 0.9, 16 * GiB, 2 * GiB, 0, int(80 * GiB * 0.9) - 18 * GiB),
        (24 * GiB, 0.9, 16 * GiB, 4 * GiB, 1 * GiB, int(24 * GiB * 0.9) - 21 * GiB),
        (16 * GiB, 0.5, 15 * GiB, 1 * GiB, 0, 0),  # over budget: nothing left, never negative
        (100, 1.0, 0, 0, 0, 100),
    ],
)
def test_kv_budget_bytes(total, util, used, act, graphs, expected):
    assert kv_budget_bytes(total, util, used, act, graphs) == expected


@pytest.mark.parametrize(
    "budget, pool, pool_all, block_bytes, block_size, expected",
    [
        (10_000, 0, 0, 100, 16, 0),  # no graphs either way
        (10_000, 0, 1_000, 100, 16, 10 * 16),  # released everything: 1000 bytes = 10 blocks
        (10_000, 200, 1_000, 100, 16, 8 * 16),  # kept part of the pool
        (10_050, 0, 1_020, 100, 16, (100 - 90) * 16),  # whole blocks on both sides
        (500, 0, 2_000, 100, 16, 5 * 16),  # capturing everything would have left no KV at all
    ],
)
def test_kv_tokens_gained(budget, pool, pool_all, block_bytes, block_size, expected):
    assert kv_tokens_gained(budget, pool, pool_all, block_bytes, block_size) == expected


# ---- plan_kv_blocks -------------------------------------------------------------------------
class _MC:
    num_hidden_layers = 4

    def kv_bytes_per_token(self, dtype):  # 4 layers x K,V x 2 heads x 8 dims x 4 bytes
        return 4 * 2 * 2 * 8 * 4


LIMITS = RunnerLimits(max_model_len=64, max_num_batched_tokens=128)


def _runner(device="cpu", **cfg):
    """What plan_kv_blocks reads of a runner: its config, device, weights (1 KiB) and the KV
    bytes of a token on it."""
    cfg.setdefault("max_num_seqs", 4)
    config = EngineConfig(**cfg)
    return SimpleNamespace(
        config=config,
        device=torch.device(device),
        model=nn.Linear(16, 16, bias=False),
        kv_bytes_per_token=lambda: _MC().kv_bytes_per_token(torch.float32),
        graphs_possible=device == "cuda" and config.use_cuda_graph != "off",
        drafter=None,
    )


WEIGHTS = 16 * 16 * 4
PER_TOKEN = 4 * 2 * 2 * 8 * 4  # bytes of KV per token (_MC)
BLOCK_BYTES = PER_TOKEN * 16


def test_cpu_default_plan():
    plan = plan_kv_blocks(_runner(), LIMITS)
    # min(4 seqs x 64 tokens, 512 MiB) but at least 64 + 16 tokens
    assert plan.num_blocks == 4 * 64 * PER_TOKEN // BLOCK_BYTES
    assert plan.kv_tokens == plan.num_blocks * 16
    assert plan.kv_source == "cpu_default" and plan.weights_bytes == WEIGHTS
    assert plan.graph_pool_source == "none"


@pytest.mark.parametrize(
    "cfg, blocks, source",
    [
        ({"kv_cache_memory": 10 * BLOCK_BYTES + 5}, 10, "kv_cache_memory"),
        ({"num_gpu_blocks_override": 7}, 7, "num_gpu_blocks_override"),
    ],
)
def test_user_fixed_kv_size(cfg, blocks, source):
    plan = plan_kv_blocks(_runner(**cfg), LIMITS)
    assert (plan.num_blocks, plan.kv_source) == (blocks, source)
    assert plan.kv_bytes == blocks * BLOCK_BYTES
    assert "set by " + source in plan.summary_line()


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA branch with 1 GiB on the card, 100 MiB of it in use, 10 MiB activation peak."""
    monkeypatch.setattr(
        memory.torch.cuda, "mem_get_info", lambda device=None: (GiB - 100 * MiB, GiB)
    )
    monkeypatch.setattr(memory, "profile_peak_activation", lambda runner, n, max_len: 10 * MiB)


def _expected_blocks(graph_bytes):
    return (int(GiB * 0.9) - 100 * MiB - 10 * MiB - graph_bytes) // BLOCK_BYTES


def test_cuda_plan_with_measured_graph_pool(fake_cuda):
    graphs = GraphPlan(
        mode="auto", candidates=[1, 2, 4], kept=[1, 2], pool_bytes=8 * MiB, pool_all_bytes=40 * MiB
    )
    plan = plan_kv_blocks(_runner("cuda"), LIMITS, graphs)
    assert plan.num_blocks == _expected_blocks(8 * MiB)
    assert plan.graph_pool_bytes == 8 * MiB and plan.graph_pool_source == "measured"
    assert plan.kv_tokens_gained == (_expected_blocks(8 * MiB) - _expected_blocks(40 * MiB)) * 16
    assert plan.other_bytes == 100 * MiB - WEIGHTS
    assert plan.activation_peak_bytes == 10 * MiB
    parts = (
        plan.weights_bytes
        + plan.other_bytes
        + plan.activation_peak_bytes
        + plan.graph_pool_bytes
        + plan.kv_bytes
    )
    assert 0 <= plan.budget_bytes - parts < BLOCK_BYTES  # the budget is spent to the block
    line = plan.summary_line()
    assert "CUDA graphs 0.01 GiB (measured)" in line and "tokens versus capturing every" in line


def test_cuda_plan_releasing_every_graph_gains_the_whole_pool(fake_cuda):
    graphs = GraphPlan(
        mode="auto", candidates=[1, 2], kept=[], pool_bytes=0, pool_all_bytes=32 * MiB
    )
    plan = plan_kv_blocks(_runner("cuda"), LIMITS, graphs)
    assert plan.graph_pool_bytes == 0
    assert plan.num_blocks == _expected_blocks(0)
    assert plan.kv_tokens_gained == 32 * MiB // BLOCK_BYTES * 16


def test_cuda_plan_without_a_measurement_reserves(fake_cuda):
    plan = plan_kv_blocks(_runner("cuda", cuda_graph="on"), LIMITS, None)
    assert plan.graph_pool_source == "reserve"
    assert plan.num_blocks == _expected_blocks(GRAPH_RESERVE_BYTES)
    assert plan.kv_tokens_gained is None


def test_cuda_plan_with_graphs_off(fake_cuda):
    plan = plan_kv_blocks(_runner("cuda", cuda_graph="off"), LIMITS, None)
    assert plan.graph_pool_source == "none" and plan.num_blocks == _expected_blocks(0)


def test_cuda_plan_with_no_room_raises(monkeypatch):
    monkeypatch.setattr(memory.torch.cuda, "mem_get_info", lambda device=None: (0, GiB))
    monkeypatch.setattr(memory, "profile_peak_activation", lambda runner, n, max_len: 0)
    with pytest.raises(ValueError, match="no memory is left"):
        plan_kv_blocks(_runner("cuda"), LIMITS, None)


def test_memory_plan_dict_has_every_component():
    d = MemoryPlan(num_blocks=1, block_bytes=2, kv_bytes=2, weights_bytes=3).as_dict()
    for key in (
        "weights_bytes",
        "other_bytes",
        "activation_peak_bytes",
        "graph_pool_bytes",
        "kv_bytes",
        "kv_tokens",
        "budget_bytes",
        "kv_tokens_gained",
    ):
        assert key in d


def test_activation_profile_keeps_positions_within_the_model(monkeypatch):
    """The worst-case prefill is split into sequences no longer than max_model_len - 1: one
    sequence of num_tokens would give positions past the RoPE table (an illegal access on GPU)."""
    import torch

    from graphwise.runner import memory

    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 100 + 7 * MiB)

    class FakeRunner:
        block_size = 16
        device = "cuda"
        config = SimpleNamespace(max_logprobs=20)

        def allocate_kv_cache(self, n: int) -> None:
            self.blocks = n

        def execute_model(self, step):
            self.step = step
            return SimpleNamespace(result=lambda: None)

        def forget_requests(self, rids):
            self.forgotten = rids

        def release_kv_cache(self):
            self.released = True

    runner = FakeRunner()
    assert memory.profile_peak_activation(runner, 2500, 1000) == 7 * MiB
    step = runner.step
    assert [r.num_new_tokens for r in step.rows] == [1000, 1000, 500]
    assert [r.num_tokens_after for r in step.rows] == [1000, 1000, 500]
    assert all(r.sample and r.num_computed_tokens == 0 for r in step.rows)
    # the peak includes the prompt-logprobs slices of the most a request may ask for
    assert all(
        n.sampling_params.prompt_logprobs == 20 and len(n.prompt_token_ids) == r.num_new_tokens
        for n, r in zip(step.new_requests, step.rows, strict=True)
    )
    tables = [r.new_block_ids for r in step.rows]
    assert [len(t) for t in tables] == [63, 63, 32] and runner.blocks == 158
    flat = [b for t in tables for b in t]
    assert sorted(flat) == list(range(158))  # no block shared between sequences
    assert runner.forgotten == [r.request_id for r in step.rows] and runner.released
