"""Speculative decoding with sampled-token logprobs (`logprobs=N`): requests that ask take
drafts, and every emitted token (accepted drafts, the token at a rejection, the bonus) gets the
entry plain decoding gives it: greedy outputs and logprobs equal the plain engine's (values to
1e-5, identical top-N ids and ranks) for the n-gram and the draft-model proposer; sampled ones
equal HF's log-softmax at the position that produced each token; one entry per token offline,
streamed, and when a stop string ends a multi-token update."""

from __future__ import annotations

import pytest
import torch

from graphwise import LLM, SamplingParams
from tests.conftest import hf_reference
from tests.engine.test_spec_decode import SPEC, _prompts
from tests.engine.test_spec_draft_model import _spec, models  # noqa: F401 (a fixture)

TOL = 1e-5


def _run(model_dir, spec, params, prompts, **kw):
    llm = LLM(model=str(model_dir), speculative_config=spec, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.get_stats().kv_blocks_used == 0
    return engine, [o.outputs[0] for o in outs]


def _assert_same_logprobs(spec_outs, plain_outs, params) -> None:
    """Same tokens; per token the same entry ids in the same order, ranks, values to TOL."""
    for got, want, p in zip(spec_outs, plain_outs, params, strict=True):
        assert got.token_ids == want.token_ids
        if p.logprobs is None:
            assert got.logprobs is None and want.logprobs is None
            continue
        assert len(got.logprobs) == len(got.token_ids) == len(want.logprobs)
        for g, w in zip(got.logprobs, want.logprobs, strict=True):
            assert list(g) == list(w)  # top-N ids in rank order, the sampled one included
            for tid in w:
                assert g[tid].rank == w[tid].rank
                assert g[tid].logprob == pytest.approx(w[tid].logprob, abs=TOL)
        assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-4)


def _greedy_params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),  # asks for none
        SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, logprobs=2),
    ]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_greedy_logprobs_with_ngram_equal_plain(tiny_model_dir, async_scheduling):
    model_dir = tiny_model_dir("llama")
    prompts = _prompts()
    params = _greedy_params()
    _, plain = _run(model_dir, None, params, prompts, async_scheduling=async_scheduling)
    engine, spec = _run(model_dir, SPEC, params, prompts, async_scheduling=async_scheduling)
    _assert_same_logprobs(spec, plain, params)
    stats = engine.get_stats()
    # the requests that ask took drafts (the repetitive prompts 0 and 3 ask), and some were
    # accepted: entries of accepted drafts and of bonus tokens were both checked
    assert stats.spec_decode_num_accepted_tokens > 0
    assert stats.steps < 24 * 2


@pytest.mark.parametrize("kind", ["self", "small"])
def test_greedy_logprobs_with_a_draft_model_equal_plain(models, kind):  # noqa: F811
    """The target drafting for itself (every draft accepted: bonus entries) and a smaller
    model (mostly rejected: entries at the rejected position)."""
    prompts = _prompts()
    params = _greedy_params()
    _, plain = _run(models["target"], None, params, prompts)
    engine, spec = _run(models["target"], _spec(models, kind), params, prompts)
    _assert_same_logprobs(spec, plain, params)
    stats = engine.get_stats()
    assert stats.spec_decode_num_drafts > 0
    if kind == "self":
        assert stats.spec_decode_num_accepted_tokens == stats.spec_decode_num_draft_tokens
    else:
        assert stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens


def _hf_logprobs(model_dir, prompt: list[int], generated: list[int]) -> torch.Tensor:
    hf = hf_reference(model_dir)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + generated])).logits[0]
    start = len(prompt) - 1
    return torch.log_softmax(logits[start : start + len(generated)].float(), dim=-1)


@pytest.mark.parametrize("proposer", ["ngram", "draft_model"])
def test_sampled_logprobs_with_speculation_equal_hf(models, proposer):  # noqa: F811
    """Sampling (rejection sampling resamples at a rejected draft): whatever tokens come out,
    each one's entry is HF's log-softmax of the raw logits at the position that produced it."""
    spec = SPEC if proposer == "ngram" else _spec(models, "early-exit")
    prompts = _prompts()
    k = 4
    # peaked enough (top_k=3) that the random text repeats and drafts are accepted; the
    # logprobs stay those of the raw logits
    params = [
        SamplingParams(temperature=0.5, top_k=3, max_tokens=32, ignore_eos=True, logprobs=k, seed=s)
        for s in range(len(prompts))
    ]
    engine, outs = _run(models["target"], spec, params, prompts)
    stats = engine.get_stats()
    assert stats.spec_decode_num_accepted_tokens > 0
    assert stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens
    for out, prompt in zip(outs, prompts, strict=True):
        ref = _hf_logprobs(models["target"], prompt, out.token_ids)
        assert len(out.logprobs) == len(out.token_ids)
        for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            assert entry[token].logprob == pytest.approx(ref[i, token].item(), abs=1e-4)
            assert entry[token].rank == int((ref[i] > ref[i, token]).sum()) + 1
            top = ref[i].topk(k)
            assert list(entry)[:k] == top.indices.tolist()
            for tid, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
                assert entry[tid].logprob == pytest.approx(value, abs=1e-4)


def test_streamed_outputs_carry_one_entry_per_token(tiny_model_dir):
    """Engine steps (what the server streams): each delta's logprobs match its token ids one to
    one, also when a verify step adds several tokens; together they are the final output's."""
    model_dir = tiny_model_dir("llama")
    prompt = _prompts()[0]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    engine = LLM(model=str(model_dir), speculative_config=SPEC).llm_engine
    engine.add_request(None, params, prompt_token_ids=prompt, request_id="r")
    ids: list[int] = []
    entries: list = []
    final = None
    widths = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            if out.finished:
                final = c
                continue
            assert len(c.logprobs) == len(c.token_ids)
            widths.append(len(c.token_ids))
            ids += c.token_ids
            entries += c.logprobs
    assert final is not None and max(widths) > 1  # some step emitted accepted drafts
    assert len(final.logprobs) == len(final.token_ids) == 24
    assert ids == final.token_ids[: len(ids)]
    assert entries == final.logprobs[: len(entries)]


def test_stop_strings_with_logprobs_and_ngram(tiny_chat_dir):
    """A stop string that ends inside a verify step's tokens drops the tokens after it and
    their logprobs: the same tokens and entries as without drafts."""
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat sat on the mat. the cat"
    base = SamplingParams(temperature=0, max_tokens=40, logprobs=2)
    text = LLM(model=str(tiny_chat_dir)).generate(prompt, base, use_tqdm=False)[0]
    text = text.outputs[0].text
    assert len(text) > 12
    at = len(text) * 2 // 3
    params = [
        base,
        SamplingParams(temperature=0, max_tokens=40, logprobs=2, stop=[text[at : at + 5]]),
    ]
    outs = {}
    for spec in (None, SPEC):
        llm = LLM(model=str(tiny_chat_dir), speculative_config=spec)
        outs[spec is not None] = [
            o.outputs[0] for o in llm.generate([prompt, prompt], params, use_tqdm=False)
        ]
        assert outs[spec is not None][1].finish_reason == "stop"
        if spec is not None:
            assert llm.llm_engine.get_stats().spec_decode_num_accepted_tokens > 0
    _assert_same_logprobs(outs[True], outs[False], params)


def test_prompt_logprobs_still_decode_plainly(tiny_model_dir):
    """prompt_logprobs keep decoding without drafts (their prompt is scored position by
    position at prefill; nothing of that changes)."""
    model_dir = tiny_model_dir("llama")
    prompts = _prompts()[:1]
    params = SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=2
    )
    engine, spec = _run(model_dir, SPEC, params, prompts)
    _, plain = _run(model_dir, None, params, prompts)
    assert engine.get_stats().spec_decode_num_draft_tokens == 0
    _assert_same_logprobs(spec, plain, [params])
