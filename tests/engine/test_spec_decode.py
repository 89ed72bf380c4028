"""N-gram speculative decoding: greedy outputs identical to plain decoding (and HF's), drafts
actually accepted, the rejection sampler's output distribution equal to the target's, stops and
limits respected, and every KV block back after finish, abort and preemption."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from graphwise import LLM, SamplingParams
from graphwise.config import EngineConfig, SpeculativeConfig
from graphwise.engine.ngram import propose_ngram
from graphwise.layers.sampler import SamplingTensors, verify_drafts
from tests.conftest import hf_greedy

SPEC = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_max": 3,
    "prompt_lookup_min": 1,
}


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    base = [rng.randrange(512) for _ in range(12)]
    return [
        base * 4,  # repetitive: the proposer finds matches at once
        [rng.randrange(512) for _ in range(30)],  # no repetition in the prompt
        base * 2 + [rng.randrange(512) for _ in range(5)],
        [7, 8, 9] * 9,
    ]


def _generate(model_dir, spec, params, prompts, **kw):
    llm = LLM(model=str(model_dir), speculative_config=spec, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    return engine, [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]


# ---- the proposer ------------------------------------------------------------------------
def test_ngram_proposer_finds_the_most_recent_longest_match():
    assert propose_ngram([1, 2, 3, 4, 5, 1, 2, 3], 3, 1, 3) == [4, 5, 1]
    # the last 2 tokens (2, 3) occur twice: the most recent occurrence wins
    assert propose_ngram([1, 2, 3, 9, 9, 2, 3, 7, 2, 3], 3, 1, 2) == [7, 2]
    # a longer match beats a more recent shorter one
    assert propose_ngram([5, 2, 3, 8, 0, 3, 6, 5, 2, 3], 3, 1, 1) == [8]
    assert propose_ngram([5, 6, 7], 3, 1, 2) == []  # nothing repeats
    assert propose_ngram([1, 2, 1], 3, 2, 2) == []  # only a 1-gram matches, min is 2
    assert propose_ngram([1, 2, 1], 3, 1, 3) == [2, 1]  # fewer than k follow
    assert propose_ngram([4, 4, 4, 4, 4, 4], 2, 1, 3) == [4, 4, 4]  # a run: the full k
    assert propose_ngram([4, 4, 4], 2, 1, 3) == [4]  # no match has k after it: the latest
    assert propose_ngram(np.array([1, 2, 1, 2]), 2, 2, 0) == []


def test_token_array_follows_a_growing_list():
    from graphwise.engine.ngram import TokenArray

    buf, tokens = TokenArray(), []
    for i in range(300):
        tokens.append(i % 7)
        if i % 3 == 0:
            assert buf.sync(tokens).tolist() == tokens
    assert buf.sync(tokens[:5]).tolist() == tokens[:5]


def test_speculative_config_errors_name_the_field():
    cfg = EngineConfig(speculative_config='{"method": "ngram", "num_speculative_tokens": 2}')
    assert cfg.speculative == SpeculativeConfig("ngram", 2)
    assert EngineConfig().speculative is None
    bad = [
        ({"method": "eagle", "num_speculative_tokens": 2}, "speculative_config.method"),
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": -1},
            "prompt_lookup",
        ),
        (
            {
                "method": "ngram",
                "num_speculative_tokens": 2,
                "prompt_lookup_min": 4,
                "prompt_lookup_max": 2,
            },
            "prompt_lookup_min",
        ),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft": 1}, "draft"),
        ("{not json", "not valid JSON"),
    ]
    for value, needle in bad:
        with pytest.raises(ValueError, match=needle):
            EngineConfig(speculative_config=value)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(speculative_config=SPEC, tensor_parallel_size=2)


def test_cli_flag_parses_json():
    import argparse

    from graphwise.config import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 5}']
    )
    assert engine_config_from_args(args).speculative.num_speculative_tokens == 5
    assert engine_config_from_args(parser.parse_args([])).speculative is None


# ---- greedy: identical tokens ------------------------------------------------------------
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_greedy_with_ngram_equals_plain_and_hf(tiny_model_dir, async_scheduling):
    model_dir = tiny_model_dir("llama")
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain_engine, plain = _generate(
        model_dir, None, params, prompts, async_scheduling=async_scheduling
    )
    spec_engine, spec = _generate(
        model_dir, SPEC, params, prompts, async_scheduling=async_scheduling
    )
    assert spec == plain
    assert [t for t, _ in spec] == hf_greedy(model_dir, prompts, 24)
    stats = spec_engine.get_stats()
    assert stats.spec_decode_num_draft_tokens > 0
    assert stats.spec_decode_num_accepted_tokens > 0  # drafts were accepted, not only proposed
    assert 0 < stats.spec_decode_acceptance_rate <= 1
    assert stats.spec_decode_mean_accepted_tokens > 1
    assert stats.steps < plain_engine.get_stats().steps  # fewer steps for the same tokens
    assert plain_engine.get_stats().spec_decode_num_draft_tokens == 0
    assert stats.kv_blocks_used == 0  # every block back (rejected slots included)


def _mixed_params(n: int) -> list[SamplingParams]:
    """Different lengths, stop tokens, min_tokens, ignore_eos off, seeded sampling."""
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(SamplingParams(temperature=0, max_tokens=5 + i, ignore_eos=True))
        elif kind == 1:
            out.append(
                SamplingParams(temperature=0, max_tokens=30, stop_token_ids=list(range(0, 512, 5)))
            )
        elif kind == 2:
            out.append(
                SamplingParams(
                    temperature=0,
                    max_tokens=14,
                    min_tokens=8,
                    stop_token_ids=list(range(0, 512, 5)),
                )
            )
        else:
            out.append(SamplingParams(temperature=0, max_tokens=20 + i))
    return out


@pytest.mark.parametrize(
    "engine_kw",
    [
        {},
        # a small pool: verify rows preempt and are preempted; prompts are chunked
        dict(block_size=8, num_gpu_blocks_override=14, max_num_batched_tokens=24, max_model_len=96),
        dict(enable_prefix_caching=False, max_num_seqs=2),
    ],
    ids=["plain", "preemption+chunked", "no-prefix-cache"],
)
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_stops_and_limits_with_ngram(tiny_model_dir, engine_kw, async_scheduling):
    model_dir = tiny_model_dir("llama")
    prompts = _prompts(1) + _prompts(2)
    params = _mixed_params(len(prompts))
    kw = dict(engine_kw, async_scheduling=async_scheduling)
    _, plain = _generate(model_dir, None, params, prompts, **kw)
    engine, spec = _generate(model_dir, SPEC, params, prompts, **kw)
    assert spec == plain
    for (tokens, reason), p, prompt in zip(spec, params, prompts, strict=True):
        assert len(tokens) <= p.max_tokens  # never past max_tokens
        assert len(prompt) + len(tokens) <= engine.max_model_len
        if reason == "stop":
            assert len(tokens) >= p.min_tokens and tokens[-1] in p.stop_token_ids
            assert not any(t in p.stop_token_ids for t in tokens[p.min_tokens : -1])
    stats = engine.get_stats()
    assert stats.spec_decode_num_accepted_tokens > 0
    assert stats.kv_blocks_used == 0
    if "num_gpu_blocks_override" in engine_kw:
        assert stats.num_preemptions > 0


def test_abort_mid_speculation_frees_every_block(tiny_model_dir):
    llm = LLM(model=str(tiny_model_dir("llama")), speculative_config=SPEC)
    engine = llm.llm_engine
    free_at_start = engine.block_manager.num_free_blocks
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    ids = [engine.add_request(None, params, prompt_token_ids=p) for p in _prompts(3)]
    # Step until a verify step is in flight (async scheduling: launched, not resolved).
    for _ in range(40):
        engine.step()
        if any(s.num_drafts_in_flight for s in engine.scheduler.requests.values()):
            break
    assert any(s.num_drafts_in_flight for s in engine.scheduler.requests.values())
    for rid in ids:
        engine.abort_request(rid)
    engine.drain()
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == free_at_start
    assert engine.block_manager.num_used_blocks == 0


def test_stop_strings_with_ngram(tiny_chat_dir):
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat sat on the mat. the cat"
    outs = {}
    for spec in (None, SPEC):
        llm = LLM(model=str(tiny_chat_dir), speculative_config=spec)
        plain = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
        text = plain[0].outputs[0].text
        outs[spec is not None] = plain[0].outputs[0].token_ids
        if len(text) > 12:
            at = len(text) * 2 // 3  # late: inside what the drafts of a verify step cover
            stop = text[at : at + 5]
            got = llm.generate(
                prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop]), use_tqdm=False
            )[0].outputs[0]
            assert got.finish_reason == "stop" and stop not in got.text
            assert got.text == text[: text.index(stop)]
            outs[(spec is not None, "stop")] = got.token_ids
        assert llm.llm_engine.get_stats().kv_blocks_used == 0
    assert outs[True] == outs[False]
    # the tokens after the one that completes the stop string are dropped, as without drafts
    assert outs.get((True, "stop")) == outs.get((False, "stop"))


def test_requests_that_cannot_speculate_decode_plainly(tiny_model_dir):
    """prompt logprobs, penalties, n > 1 get no drafts, and equal the plain engine's outputs."""
    model_dir = tiny_model_dir("llama")
    prompts = _prompts()[:2]
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=2),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3),
    ]
    engine, spec = _generate(model_dir, SPEC, params, prompts)
    _, plain = _generate(model_dir, None, params, prompts)
    assert spec == plain
    assert engine.get_stats().spec_decode_num_draft_tokens == 0
    llm = LLM(model=str(model_dir), speculative_config=SPEC)
    out = llm.generate(
        {"prompt_token_ids": prompts[0]},
        SamplingParams(n=2, temperature=0, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )
    assert len(out[0].outputs) == 2 and llm.llm_engine.get_stats().spec_decode_num_draft_tokens == 0


# ---- sampling ------------------------------------------------------------------------------
def test_seeded_sampling_with_ngram_is_reproducible(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    prompts = _prompts()
    params = [
        SamplingParams(temperature=0.7, seed=11 + i, max_tokens=20, ignore_eos=True)
        for i in range(4)
    ]
    runs = []
    for async_scheduling in (False, True, False):
        engine, out = _generate(model_dir, SPEC, params, prompts, async_scheduling=async_scheduling)
        runs.append(out)
        assert engine.get_stats().kv_blocks_used == 0
    assert runs[0] == runs[1] == runs[2]


def _verify_many(
    logits_rows, drafts, temperature, top_p=1.0, trials=100000, seed=0, rule=verify_drafts
):
    """`trials` identical rows: each verifies `drafts` against `logits_rows` [k, V]; the bonus is
    sampled from `bonus_logits` by the caller's rule (here: from the last row's distribution)."""
    k, vocab = len(drafts), logits_rows.shape[1] - 0
    gen = torch.Generator().manual_seed(seed)
    draft_logits = logits_rows[:k].repeat(trials, 1)
    draft_ids = torch.tensor(drafts * trials)
    slots = torch.arange(trials * k)
    num = [k] * trials
    num_t = torch.full((trials,), k)
    # the bonus: an ordinary sample from the last position's distribution
    p_last = torch.softmax(logits_rows[k] / temperature, -1)
    bonus = torch.multinomial(p_last, trials, replacement=True, generator=gen)
    t = SamplingTensors(
        temperature=torch.full((trials,), temperature),
        top_k=torch.full((trials,), vocab),
        top_p=torch.full((trials,), top_p),
        all_greedy=False,
        any_top_k_top_p=top_p < 1.0,
        generators=[None] * trials,
    )
    out, last = rule(draft_logits, draft_ids, slots, num, num_t, bonus, t, gen)
    return out


def _tv(counts: np.ndarray, p: np.ndarray) -> float:
    return 0.5 * float(np.abs(counts / counts.sum() - p).sum())


def _chi2_pvalue(counts: np.ndarray, p: np.ndarray) -> float:
    """Pearson's chi-square test of counts against p (survival function of chi2(df) through
    the regularized upper incomplete gamma: sf(x) = Q(df / 2, x / 2))."""
    keep = p > 0
    expected = p[keep] * counts.sum()
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(stat / 2)))


def _first_two_distributions(out: torch.Tensor, vocab: int, draft0: int):
    first = np.bincount(out[:, 0].numpy(), minlength=vocab)
    cond = out[out[:, 0] == draft0][:, 1].numpy()
    second = np.bincount(cond, minlength=vocab)
    return first, second


@pytest.mark.parametrize("drafts", [[2, 5], [0, 3], [2, 2]], ids=["likely", "unlikely", "repeat"])
def test_rejection_sampler_keeps_the_target_distribution(drafts):
    """Token 1 of each row must follow p0 whatever the draft; given token 1 == draft 1 (so the
    second draft was verified), token 2 must follow p1. Chi-square and total variation over
    100,000 samples; the TV bound is sqrt(V / n), about 4 standard deviations of its noise. Fixed seed."""
    vocab, temperature = 8, 0.9
    torch.manual_seed(3)
    logits = torch.randn(3, vocab) * 1.5
    logits[0, 2] += 1.5  # draft 2 likely at position 0
    out = _verify_many(logits, drafts, temperature)
    p = torch.softmax(logits / temperature, -1).double().numpy()
    first, second = _first_two_distributions(out, vocab, drafts[0])
    assert _tv(first, p[0]) < (vocab / first.sum()) ** 0.5
    assert _chi2_pvalue(first, p[0]) > 1e-4
    assert second.sum() > 1000
    assert _tv(second, p[1]) < (vocab / second.sum()) ** 0.5
    assert _chi2_pvalue(second, p[1]) > 1e-4


def test_a_wrong_rejection_rule_is_caught():
    """The same statistics reject a sampler that resamples from p itself (draft not removed):
    the test above would fail on it."""

    def wrong(draft_logits, draft_ids, slots, num, num_t, bonus, t, gen):
        # accept with p(d), else sample from p (d included): d gets p(d) + (1 - p(d)) p(d)
        p = torch.softmax(draft_logits / t.temperature[0], -1)
        p_d = p.gather(1, draft_ids[:, None]).squeeze(1)
        u = torch.rand(p_d.shape, generator=gen)
        resample = torch.multinomial(p, 1, generator=gen).squeeze(1)
        token = torch.where(u < p_d, draft_ids, resample)
        return token.view(-1, num[0]), None

    vocab, temperature = 8, 0.9
    torch.manual_seed(3)
    logits = torch.randn(3, vocab) * 1.5
    logits[0, 2] += 1.5
    out = _verify_many(logits, [2, 5], temperature, rule=wrong)
    p = torch.softmax(logits / temperature, -1).double().numpy()
    first = np.bincount(out[:, 0].numpy(), minlength=vocab)
    assert _tv(first, p[0]) > 3 * (vocab / first.sum()) ** 0.5
    assert _chi2_pvalue(first, p[0]) < 1e-10


def test_greedy_verification_accepts_while_argmax_matches():
    logits = torch.full((3, 6), -5.0)
    logits[0, 4] = logits[1, 1] = logits[2, 3] = 5.0  # argmax 4, 1, 3
    bonus = torch.tensor([2, 2])
    # row 0: drafts [4, 1] both accepted -> bonus; row 1: draft [0] rejected -> argmax 4
    out, last = verify_drafts(
        torch.stack([logits[0], logits[1], logits[0]]),
        torch.tensor([4, 1, 0]),
        torch.tensor([0, 1, 2]),
        [2, 1],
        torch.tensor([2, 1]),
        bonus,
        None,
        None,
    )
    assert out.tolist() == [[4, 1, 2], [4, -1, -1]]
    assert last.tolist() == [2, 4]


def test_a_failed_verify_step_rolls_back_and_the_others_recompute(tiny_model_dir, monkeypatch):
    """A verify step that fails to launch: the request blamed for it fails alone, the others
    (drafts never verified) go back to waiting, recompute and finish with the tokens they
    would have had; no block leaks."""
    check_failed_verify_step(tiny_model_dir("llama"), SPEC, monkeypatch)


def check_failed_verify_step(model_dir, spec, monkeypatch):
    """Fail the first step that verifies drafts (shared with the draft-model tests); returns
    the engine after every request ended."""
    prompts = _prompts(4)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    _, clean = _generate(model_dir, spec, params, prompts)
    llm = LLM(model=str(model_dir), speculative_config=spec)
    engine = llm.llm_engine
    rids = [engine.add_request(None, params, prompt_token_ids=p) for p in prompts]
    real = engine.executor.execute_model
    failed: list[str] = []

    def execute(step):
        if not failed and step.num_draft_tokens:
            failed.append(step.rows[0].request_id)
            raise RuntimeError("injected launch failure")
        return real(step)

    monkeypatch.setattr(engine.executor, "execute_model", execute)
    monkeypatch.setattr(
        engine.executor.driver, "find_bad_rows", lambda step: {failed[0]: "injected"}
    )
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert failed
    for rid, (tokens, _) in zip(rids, clean, strict=True):
        if rid == failed[0]:
            assert done[rid].outputs[0].finish_reason == "error"
        else:
            assert done[rid].outputs[0].token_ids == tokens
    assert engine.block_manager.num_used_blocks == 0
    return engine


def test_stop_string_inside_a_multi_token_update_drops_what_follows(tiny_chat_dir):
    """A verify step hands the output processor several tokens at once: the tokens after the
    one completing a stop string are dropped, as if they came one by one (they would never have
    been sampled without drafts)."""
    import time as _time

    from transformers import AutoTokenizer

    from graphwise.engine.output_processor import OutputProcessor
    from graphwise.engine.scheduler import RequestUpdate

    tok = AutoTokenizer.from_pretrained(tiny_chat_dir)
    ids = tok.encode(" alpha beta gamma delta epsilon", add_special_tokens=False)
    params = SamplingParams(max_tokens=50, stop=["gamma"])
    results = []
    for chunks in ([ids], [[t] for t in ids]):  # one update with all, one update per token
        op = OutputProcessor(tok)
        op.add_request("r", None, [1, 2], params, _time.monotonic())
        final, stopped = None, []
        for chunk in chunks:
            outs, st = op.process([RequestUpdate("r", list(chunk))])
            stopped += st
            final = next((o for o in outs if o.finished), final)
            if final is not None:
                break
        assert final is not None and stopped == [("r", "gamma")]
        results.append((final.outputs[0].text, final.outputs[0].token_ids))
    assert results[0] == results[1]
    assert "gamma" not in results[0][0] and len(results[0][1]) < len(ids)


def test_random_path_with_top_k_1_equals_greedy(tiny_model_dir):
    """temperature 1 with top_k=1 goes through the rejection sampler (random rows) but its
    target distribution is one-hot at the argmax: the tokens must be greedy's, which checks
    that each draft is verified against the logits of the right position."""
    model_dir = tiny_model_dir("llama")
    prompts = _prompts(5)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    top1 = SamplingParams(temperature=1.0, top_k=1, max_tokens=20, ignore_eos=True, seed=3)
    _, plain = _generate(model_dir, None, greedy, prompts)
    engine, spec = _generate(model_dir, SPEC, top1, prompts)
    assert spec == plain
    assert engine.get_stats().spec_decode_num_accepted_tokens > 0


def test_prefix_cache_holds_only_verified_tokens(tiny_model_dir):
    """Continuations of earlier outputs hit the blocks the verify steps registered; their
    tokens equal an engine's without speculation or prefix caching (a block with a rejected
    draft's KV would change them)."""
    model_dir = tiny_model_dir("llama")
    prompts = _prompts(6)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = LLM(model=str(model_dir), speculative_config=SPEC, block_size=8)
    first = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    follow = [p + o.outputs[0].token_ids for p, o in zip(prompts, first, strict=True)]
    hits = llm.llm_engine.block_manager.prefix_hits
    again = llm.generate([{"prompt_token_ids": p} for p in follow], params, use_tqdm=False)
    assert llm.llm_engine.block_manager.prefix_hits - hits >= len(prompts) * 5
    assert llm.llm_engine.get_stats().spec_decode_num_accepted_tokens > 0
    _, plain = _generate(model_dir, None, params, follow, enable_prefix_caching=False)
    assert [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in again] == plain
