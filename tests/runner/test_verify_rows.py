"""Verify steps attend as decode rows (runner/inputs.py as_decode_rows): one attention row per
new token, with its own KV length and its sequence's block table, so that a verify step replays
the decode CUDA graph of its token count. The metadata, the attention it gives (equal to the
extend path's, with sliding windows, soft-caps and an FP8 cache), the graph runner's decision,
and greedy tokens with n-gram and draft-model speculation against plain decoding and HF."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from graphwise import LLM, SamplingParams
from graphwise.config import EngineConfig
from graphwise.core.step import ScheduledRow, SchedulerOutput
from graphwise.kernels.reference import FP8_KV_DTYPE
from graphwise.layers.attention.torch_backend import TorchAttentionBackend
from graphwise.runner.cuda_graph import CudaGraphRunner
from graphwise.runner.inputs import (
    MAX_DECODE_ROW_TOKENS,
    RequestStates,
    RunnerRequest,
    Uploader,
    build_step_inputs,
)
from tests.conftest import hf_greedy

BLOCK = 4
UPLOAD = Uploader(torch.device("cpu"))


def _states(tables: dict[str, list[int]]) -> RequestStates:
    states = RequestStates()
    for rid, blocks in tables.items():
        states[rid] = RunnerRequest(SamplingParams(temperature=0), ())
        states[rid].extend(blocks, reset=True)
    return states


def _verify(rid: str, computed: int, drafts: list[int], first: int = 5) -> ScheduledRow:
    return ScheduledRow(
        rid, computed, 1 + len(drafts), [first, *drafts], sample=True, num_draft_tokens=len(drafts)
    )


def _decode(rid: str, computed: int, token: int = 9) -> ScheduledRow:
    return ScheduledRow(rid, computed, 1, [token], sample=True)


# ---- the metadata --------------------------------------------------------------------------
def test_a_verify_step_is_one_decode_row_per_token():
    states = _states({"a": [3, 1, 8], "b": [7, 2, 5, 0, 6, 11]})
    step = SchedulerOutput(rows=[_decode("a", 5), _verify("b", 17, [11, 12, 13])])
    inputs = build_step_inputs(step, states, UPLOAD, BLOCK, None)
    meta = inputs.meta
    assert meta.is_decode and meta.max_q_len == 1 and meta.batch_size == 5
    # a: position 5 (KV length 6); b: positions 17..20 (each sees itself and what precedes)
    assert meta.seq_lens.tolist() == [6, 18, 19, 20, 21] == meta.seq_lens_cpu
    assert meta.q_lens_cpu == [1] * 5 and meta.max_seq_len == 21
    assert meta.cu_seqlens_q.tolist() == list(range(6))
    a, b = [3, 1, 8, 0, 0, 0], [7, 2, 5, 0, 6, 11]
    assert meta.block_tables.tolist() == [a, b, b, b, b]
    # per token already: unchanged by the expansion
    assert inputs.input_ids.tolist() == [9, 5, 11, 12, 13]
    assert inputs.positions.tolist() == [5, 17, 18, 19, 20]
    slot = {p: b[p // BLOCK] * BLOCK + p % BLOCK for p in range(17, 21)}
    assert meta.slot_mapping.tolist() == [1 * BLOCK + 1, *slot.values()]
    assert inputs.logits_indices.tolist() == [0, 4]
    assert inputs.spec is not None and inputs.spec.logits_indices.tolist() == [1, 2, 3]


def test_steps_that_stay_extend_rows():
    states = _states({"a": [3, 1, 8], "b": [7, 2, 5, 0, 6, 11]})
    prompt = ScheduledRow("a", 0, 3, [1, 2, 3])  # a prompt chunk beside a verify row
    cases = {
        "prompt row": [prompt, _verify("b", 17, [11, 12])],
        "verify row past the limit": [
            _verify("b", 0, list(range(MAX_DECODE_ROW_TOKENS)))  # 17 tokens in one row
        ],
    }
    for name, rows in cases.items():
        meta = build_step_inputs(SchedulerOutput(rows=rows), states, UPLOAD, BLOCK, None).meta
        assert not meta.is_decode, name
        assert meta.batch_size == len(rows), name
        assert meta.q_lens_cpu == [r.num_new_tokens for r in rows], name
    # more tokens than the largest decode graph: the extend path (it reads each row's KV once)
    step = SchedulerOutput(rows=[_decode("a", 5), _verify("b", 17, [11, 12, 13])])
    for limit, decode in ((4, False), (5, True)):
        meta = build_step_inputs(step, states, UPLOAD, BLOCK, None, max_decode_rows=limit).meta
        assert meta.is_decode == decode, limit
    # a plain decode step is unchanged
    plain = build_step_inputs(SchedulerOutput(rows=[_decode("a", 5)]), states, UPLOAD, BLOCK, None)
    assert plain.meta.is_decode and plain.meta.block_tables.tolist() == [[3, 1, 8]]


# ---- the attention it gives ----------------------------------------------------------------
@pytest.mark.parametrize(
    "window,softcap,kv_dtype",
    [
        (None, None, torch.float32),
        (6, None, torch.float32),
        (3, 2.0, torch.float32),
        (None, None, FP8_KV_DTYPE),
        (5, 1.5, FP8_KV_DTYPE),
    ],
    ids=["full", "window", "window-softcap", "fp8", "fp8-window-softcap"],
)
def test_decode_rows_attend_like_the_extend_path(window, softcap, kv_dtype):
    """Through the torch backend (the CPU path): the step's K/V are stored, then each token
    attends; the decode-row metadata and the extend metadata give the same outputs and the
    same cache."""
    torch.manual_seed(0)
    hq, hkv, d, num_blocks = 4, 2, 8, 12
    states = _states({"a": [3, 1, 8], "b": [7, 2, 5, 0, 6], "c": [9, 4, 10]})
    rows = [_verify("a", 7, [1, 2, 3]), _decode("b", 13), _verify("c", 2, [4, 5])]
    step = SchedulerOutput(rows=rows)
    extend = build_step_inputs(step, states, UPLOAD, BLOCK, None, max_decode_rows=0)
    decode = build_step_inputs(step, states, UPLOAD, BLOCK, None)
    assert not extend.meta.is_decode and decode.meta.is_decode
    backend = TorchAttentionBackend(scratch_slot=num_blocks * BLOCK)
    cache = torch.randn(2, num_blocks + 1, BLOCK, hkv, d).to(kv_dtype)  # + the scratch block
    T = extend.input_ids.shape[0]
    q, k, v = torch.randn(T, hq, d), torch.randn(T, hkv, d), torch.randn(T, hkv, d)
    outs, caches = [], []
    for inputs in (extend, decode):
        kc, vc = cache[0].clone(), cache[1].clone()
        out = backend.forward(
            q, k, v, kc, vc, inputs.meta, 0.4, window, softcap, k_scale=0.5, v_scale=2.0
        )
        outs.append(out)
        caches.append((kc.view(torch.uint8), vc.view(torch.uint8)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(x, y) for x, y in zip(caches[0], caches[1], strict=True))


# ---- the graph runner takes it -------------------------------------------------------------
def test_the_decode_graph_of_the_token_count_replays_a_verify_step():
    """CudaGraphRunner's decision (can_replay / bucket_for) on a verify step, on the CPU: its
    buckets reach max_num_seqs x (k + 1) rows with speculation."""
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    config = EngineConfig(max_num_seqs=2, speculative_config=spec)
    assert config.cuda_graph_max_rows == 8
    assert EngineConfig(max_num_seqs=2).cuda_graph_max_rows == 2
    assert EngineConfig(max_num_seqs=256, speculative_config=spec).cuda_graph_max_rows == 512
    capped = EngineConfig(max_num_seqs=4, cuda_graph_max_bs=6, speculative_config=spec)
    assert capped.cuda_graph_max_rows == 6
    runner = SimpleNamespace(
        device=torch.device("cpu"),
        dtype=torch.float32,
        block_size=BLOCK,
        parallel=SimpleNamespace(is_first_stage=True),
        model_config=SimpleNamespace(hidden_size=8),
        backend=TorchAttentionBackend(scratch_slot=0),
    )
    graphs = CudaGraphRunner(runner, config, max_model_len=64)  # type: ignore[arg-type]
    assert graphs.buckets == [1, 2, 4, 8]
    states = _states({"a": [3, 1, 8], "b": [7, 2, 5, 0, 6, 11], "c": [9]})
    step = SchedulerOutput(rows=[_decode("a", 5), _verify("b", 17, [11, 12, 13])])
    inputs = build_step_inputs(step, states, UPLOAD, BLOCK, None, config.cuda_graph_max_rows)
    assert graphs.can_replay(inputs) and graphs.bucket_for(inputs.meta.batch_size) == 8
    # the static buffers take the step as a decode step of 5 rows, the rest padding
    runner.backend.fill_replay_metadata(8, inputs.meta)
    assert runner.backend.g_seq_lens.tolist() == [6, 18, 19, 20, 21, 0, 0, 0]
    assert runner.backend.g_slot_mapping[5:].tolist() == [-1, -1, -1]
    assert runner.backend.g_block_tables[1:5, :6].tolist() == [[7, 2, 5, 0, 6, 11]] * 4
    # 9 rows: past the largest bucket (decode rows all the same, eagerly, if allowed)
    rows = [_verify("a", 5, [1, 2, 3]), _verify("b", 17, [11, 12, 13]), _decode("c", 2)]
    big = SchedulerOutput(rows=rows)
    over = build_step_inputs(big, states, UPLOAD, BLOCK, None, config.cuda_graph_max_rows + 4)
    assert over.meta.is_decode and not graphs.can_replay(over)  # eager decode rows
    extend = build_step_inputs(step, states, UPLOAD, BLOCK, None, max_decode_rows=0)
    assert not graphs.can_replay(extend)


# ---- end to end: the same tokens -----------------------------------------------------------
NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_max": 3,
    "prompt_lookup_min": 1,
}


def _prompts() -> list[list[int]]:
    rng = random.Random(3)
    base = [rng.randrange(512) for _ in range(10)]
    return [base * 4, [rng.randrange(512) for _ in range(20)], [7, 8, 9] * 8]


def _run(model_dir, spec, async_scheduling, prompts, max_tokens=24):
    llm = LLM(
        model=str(model_dir),
        speculative_config=spec,
        async_scheduling=async_scheduling,
        max_num_seqs=4,
    )
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return llm.llm_engine, [o.outputs[0].token_ids for o in outs]


@pytest.fixture
def attention_steps(monkeypatch):
    """(is_decode, tokens, attention rows) of every attention call (each layer, both models)."""
    seen: list[tuple[bool, int, int]] = []
    forward = TorchAttentionBackend.forward

    def spy(self, q, k, v, k_cache, v_cache, meta, *args, **kw):
        seen.append((meta.is_decode, q.shape[0], meta.batch_size))
        return forward(self, q, k, v, k_cache, v_cache, meta, *args, **kw)

    monkeypatch.setattr(TorchAttentionBackend, "forward", spy)
    return seen


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])  # sliding windows (Gemma 2: soft-caps)
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_ngram_verify_as_decode_keeps_greedy_tokens(
    tiny_model_dir, arch, async_scheduling, attention_steps
):
    model_dir = tiny_model_dir(arch)
    prompts = _prompts()
    _, plain = _run(model_dir, None, async_scheduling, prompts)
    attention_steps.clear()
    engine, spec = _run(model_dir, NGRAM, async_scheduling, prompts)
    assert spec == plain == hf_greedy(model_dir, prompts, 24)
    assert engine.get_stats().spec_decode_num_accepted_tokens > 0
    # verify steps ran as decode rows: 3 sequences, more tokens than that
    assert any(decode and t > 3 for decode, t, _ in attention_steps)
    assert all(t == rows for decode, t, rows in attention_steps if decode)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_draft_model_verify_as_decode_keeps_greedy_tokens(
    tiny_model_dir, async_scheduling, attention_steps
):
    """The target drafting for itself (a second KV cache on the same block ids): the draft's
    mirror, catch-up and draft decode steps build their own metadata; the target's verify
    steps attend as decode rows."""
    model_dir = tiny_model_dir("mistral")
    prompts = _prompts()
    _, plain = _run(model_dir, None, async_scheduling, prompts)
    attention_steps.clear()
    spec = {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 3}
    engine, got = _run(model_dir, spec, async_scheduling, prompts)
    assert got == plain == hf_greedy(model_dir, prompts, 24)
    stats = engine.get_stats()
    assert stats.spec_decode_acceptance_rate > 0.9  # the target itself: (nearly) every draft
    assert any(decode and t > 3 for decode, t, _ in attention_steps)
