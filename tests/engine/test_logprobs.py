"""Sampled-token logprobs (SamplingParams.logprobs, issue 15) against HF transformers: the
log-softmax of the raw logits at each generated position, the sampled token always included,
the top-k in order, in a batch where other requests ask for none."""

from __future__ import annotations

import pytest
import torch

from graphwise import LLM, SamplingParams
from graphwise.engine.validation import InvalidRequest
from tests.conftest import hf_reference

PROMPTS = [[5, 9, 13, 2, 77], [100, 3, 3, 41], [7] * 9]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen2")


def _hf_logprobs(model_dir, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(generated), V]: HF's log-softmax at each position that produced a generated token."""
    hf = hf_reference(model_dir)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + generated])).logits[0]
    start = len(prompt) - 1
    return torch.log_softmax(logits[start : start + len(generated)].float(), dim=-1)


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_greedy_logprobs_equal_hf(model_dir, async_scheduling):
    llm = LLM(model=str(model_dir), async_scheduling=async_scheduling)
    k = 5
    params = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=k),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),  # asks for none
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0),
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert outs[1].outputs[0].logprobs is None
    for out, prompt, p in zip(outs, PROMPTS, params, strict=True):
        o = out.outputs[0]
        if p.logprobs is None:
            continue
        ref = _hf_logprobs(model_dir, prompt, o.token_ids)
        assert len(o.logprobs) == len(o.token_ids)
        total = 0.0
        for i, (token, entry) in enumerate(zip(o.token_ids, o.logprobs, strict=True)):
            assert entry[token].rank == 1  # greedy: the most likely
            assert entry[token].logprob == pytest.approx(ref[i, token].item(), abs=1e-4)
            total += entry[token].logprob
            if p.logprobs:
                top = ref[i].topk(k)
                assert list(entry)[:k] == top.indices.tolist()
                for tid, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
                    assert entry[tid].logprob == pytest.approx(value, abs=1e-4)
                assert [entry[t].rank for t in top.indices.tolist()] == list(range(1, k + 1))
            else:
                assert list(entry) == [token]
        assert o.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_sampled_logprobs_are_of_the_raw_distribution(model_dir):
    """A hot, top-k-filtered sample still reports the model's own log-probability and rank."""
    llm = LLM(model=str(model_dir))
    params = SamplingParams(
        temperature=1.7, top_k=20, seed=11, max_tokens=8, ignore_eos=True, logprobs=2
    )
    (out,) = llm.generate({"prompt_token_ids": PROMPTS[0]}, params, use_tqdm=False)
    o = out.outputs[0]
    ref = _hf_logprobs(model_dir, PROMPTS[0], o.token_ids)
    for i, (token, entry) in enumerate(zip(o.token_ids, o.logprobs, strict=True)):
        assert entry[token].logprob == pytest.approx(ref[i, token].item(), abs=1e-4)
        assert entry[token].rank == int((ref[i] > ref[i, token]).sum()) + 1
    # the stream carries the same entries, a step at a time
    engine = llm.llm_engine
    rid = engine.add_request(None, params, prompt_token_ids=PROMPTS[0])
    streamed = []
    while engine.has_unfinished_requests():
        for delta in engine.step():
            if delta.request_id == rid and not delta.finished:
                streamed.extend(delta.outputs[0].logprobs)
            elif delta.request_id == rid:
                final = delta.outputs[0].logprobs
    assert streamed == final[: len(streamed)] and len(final) == 8


def test_more_logprobs_than_max_logprobs_is_refused(model_dir):
    llm = LLM(model=str(model_dir), max_logprobs=3)
    with pytest.raises(InvalidRequest, match="max_logprobs") as e:
        llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(logprobs=4), use_tqdm=False)
    assert e.value.param == "logprobs"
    with pytest.raises(ValueError, match="logprobs must be >= 0"):
        SamplingParams(logprobs=-1)
