"""Prompt logprobs (SamplingParams.prompt_logprobs, issue 15) against HF transformers: each
prompt token's log-softmax of the raw logits at the position before it, its rank and the top-k,
in vLLM's shape (None first); the same with chunked prefill, sliced logits, a prefix another
request left in the cache, a batch of other requests, and a preemption that recomputes."""

from __future__ import annotations

import pytest
import torch

from graphwise import LLM, SamplingParams
from graphwise.core.step import PromptLogprobs
from graphwise.engine.validation import InvalidRequest
from graphwise.runner import logprobs as runner_logprobs
from tests.conftest import hf_reference

PROMPT = [5, 9, 13, 2, 77, 100, 3, 3, 41, 7, 7, 8, 250, 11, 19, 300, 4, 4, 60, 61, 62, 9, 1]
OTHER = [100, 3, 3, 41, 8]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen2")


def _hf_prompt_logprobs(model_dir, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, V]: HF's log-softmax at each prompt position but the last."""
    with torch.no_grad():
        logits = hf_reference(model_dir)(torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits[:-1].float(), dim=-1)


def _check(entries, prompt: list[int], ref: torch.Tensor, k: int) -> None:
    assert len(entries) == len(prompt)
    assert entries[0] is None
    for i, entry in enumerate(entries[1:]):
        token = prompt[i + 1]
        row = ref[i]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-3)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = row.topk(k) if k else None
        if top is not None:
            assert list(entry)[:k] == top.indices.tolist()
            pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
            for r, (tid, value) in enumerate(pairs):
                assert entry[tid].logprob == pytest.approx(value, abs=1e-3)
                assert entry[tid].rank == r + 1
        expected = set(top.indices.tolist() if top is not None else []) | {token}
        assert set(entry) == expected


def _params(k: int, **kw) -> SamplingParams:
    kw = {"temperature": 0, "max_tokens": 3, "ignore_eos": True, **kw}
    return SamplingParams(prompt_logprobs=k, **kw)


@pytest.mark.parametrize("k", [0, 1, 5])
def test_prompt_logprobs_equal_hf(model_dir, k):
    llm = LLM(model=str(model_dir))
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, _params(k), use_tqdm=False)
    _check(out.prompt_logprobs, PROMPT, _hf_prompt_logprobs(model_dir, PROMPT), k)
    assert out.outputs[0].logprobs is None  # sample logprobs were not asked for


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_chunked_prefill_and_sliced_logits(model_dir, monkeypatch, async_scheduling):
    """Chunks of 5 tokens (the prompt spans five steps) and logits 3 positions at a time."""
    monkeypatch.setattr(runner_logprobs, "PROMPT_SLICE_ELEMENTS", 3 * 512)
    llm = LLM(
        model=str(model_dir),
        max_num_batched_tokens=5,
        max_num_seqs=2,
        async_scheduling=async_scheduling,
    )
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, _params(4), use_tqdm=False)
    _check(out.prompt_logprobs, PROMPT, _hf_prompt_logprobs(model_dir, PROMPT), 4)


def test_cached_prefix_still_reports_its_logprobs(model_dir):
    """A request whose prompt starts with blocks another request left in the prefix cache
    computes them again (no cache hit) and reports every prompt position."""
    llm = LLM(model=str(model_dir), block_size=4)
    first = PROMPT[:16] + [33, 34]
    llm.generate({"prompt_token_ids": first}, _params(0), use_tqdm=False)
    (warm,) = llm.generate(
        {"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=1), use_tqdm=False
    )
    assert warm.num_cached_tokens == 16  # the cache does hold the shared prefix
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, _params(2), use_tqdm=False)
    assert out.num_cached_tokens == 0
    _check(out.prompt_logprobs, PROMPT, _hf_prompt_logprobs(model_dir, PROMPT), 2)


def test_in_a_batch_with_other_requests(model_dir):
    llm = LLM(model=str(model_dir), max_num_batched_tokens=16)
    prompts = [OTHER, PROMPT, PROMPT[:7], OTHER[:2]]
    params = [
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2),
        _params(3, logprobs=1),
        _params(1),
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert outs[0].prompt_logprobs is None and outs[3].prompt_logprobs is None
    _check(outs[1].prompt_logprobs, PROMPT, _hf_prompt_logprobs(model_dir, PROMPT), 3)
    _check(outs[2].prompt_logprobs, PROMPT[:7], _hf_prompt_logprobs(model_dir, PROMPT[:7]), 1)
    # the outputs are what they are without prompt logprobs
    plain = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
        use_tqdm=False,
    )
    for a, b in zip(outs, plain, strict=True):
        assert a.outputs[0].token_ids[:3] == b.outputs[0].token_ids[:3]


def test_one_token_prompt(model_dir):
    llm = LLM(model=str(model_dir))
    (out,) = llm.generate({"prompt_token_ids": [42]}, _params(3), use_tqdm=False)
    assert out.prompt_logprobs == [None]


def test_streamed_once_with_the_first_token(model_dir):
    llm = LLM(model=str(model_dir), max_num_batched_tokens=6)
    engine = llm.llm_engine
    rid = engine.add_request(None, _params(2, max_tokens=5), prompt_token_ids=PROMPT)
    seen = []
    final = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id != rid:
                continue
            if o.finished:
                final = o
            elif o.prompt_logprobs is not None:
                seen.append(o.prompt_logprobs)
    assert len(seen) == 1 and final is not None
    assert seen[0] == final.prompt_logprobs
    _check(final.prompt_logprobs, PROMPT, _hf_prompt_logprobs(model_dir, PROMPT), 2)


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["cache", "no-cache"])
def test_preemption_does_not_duplicate_entries(model_dir, prefix_caching):
    """A KV pool so small that requests preempt each other and recompute their prompts (all of
    it without the prefix cache)."""
    llm = LLM(
        model=str(model_dir),
        block_size=4,
        num_gpu_blocks_override=12,
        max_model_len=48,
        enable_prefix_caching=prefix_caching,
    )
    prompts = [PROMPT, PROMPT[3:] + [5, 6]]
    params = _params(2, max_tokens=20)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for out, prompt in zip(outs, prompts, strict=True):
        _check(out.prompt_logprobs, prompt, _hf_prompt_logprobs(model_dir, prompt), 2)


def test_bad_values_are_refused(model_dir):
    with pytest.raises(ValueError, match="prompt_logprobs must be >= 0"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(ValueError, match="prompt_logprobs must be an integer"):
        SamplingParams(prompt_logprobs=1.5)
    llm = LLM(model=str(model_dir), max_logprobs=3)
    with pytest.raises(InvalidRequest, match="max_logprobs") as e:
        llm.generate({"prompt_token_ids": [1, 2]}, _params(4), use_tqdm=False)
    assert e.value.param == "prompt_logprobs"


def test_recomputed_chunks_are_not_repeated():
    """A preemption mid-prefill recomputes positions already reported: they are dropped."""
    acc = PromptLogprobs(0)
    acc.extend(PromptLogprobs(0, [-1.0, -2.0], [1, 2], [[], []], [[], []]))
    acc.extend(PromptLogprobs(0, [-1.5, -2.5, -3.0], [1, 2, 3], [[], [], []], [[], [], []]))
    acc.extend(PromptLogprobs(3, [-4.0], [4], [[]], [[]]))
    assert acc.logprobs == [-1.0, -2.0, -3.0, -4.0] and acc.ranks == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="gap"):
        acc.extend(PromptLogprobs(6, [-1.0], [1], [[]], [[]]))


def test_n_samples_score_the_prompt_once(model_dir):
    """n > 1: sample 0 scores the prompt; the request's prompt logprobs equal a lone request's
    (and HF's), and each sample still equals a lone request with seed + i."""
    llm = LLM(model=str(model_dir))
    params = _params(2, temperature=1.0, seed=11, n=3, max_tokens=4)
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)
    assert len(out.outputs) == 3
    _check(out.prompt_logprobs, PROMPT, _hf_prompt_logprobs(model_dir, PROMPT), 2)
    for i, sample in enumerate(out.outputs):
        lone = _params(2, temperature=1.0, seed=11 + i, max_tokens=4)
        (ref,) = llm.generate({"prompt_token_ids": PROMPT}, lone, use_tqdm=False)
        assert sample.token_ids == ref.outputs[0].token_ids
    llm.shutdown()
