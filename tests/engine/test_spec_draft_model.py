"""Draft-model speculative decoding: greedy outputs identical to plain decoding (and HF's) with
drafts that agree (the target drafting for itself), drafts that mostly do not (a smaller model
and an early-exit cut of the target), under prefix caching, chunked prefill, preemption, async
scheduling, stops and limits; the draft's KV kept right (a self-draft accepts everything, also
from prefix-cached blocks); rejection sampling with the draft's distribution q keeps the
target's (chi-square, on the rule alone and end to end); no KV block leaks; bad configs
refused with errors that say what is wrong."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from graphwise import LLM, SamplingParams
from graphwise.config import EngineConfig, SpeculativeConfig, add_engine_args
from graphwise.layers.sampler import SamplingTensors, verify_drafts
from tests.conftest import TINY_COMMON, build_tiny, hf_greedy, hf_reference
from tests.engine.test_spec_decode import _generate, _prompts, check_failed_verify_step


def _save_llama(path: Path, seed: int, **overrides) -> Path:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(**{**TINY_COMMON, **overrides})
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    """The target (tiny Llama) and drafts with its vocabulary: a smaller model (1 layer,
    hidden 32), another random model of its shape, and one whose vocabulary differs."""
    root = tmp_path_factory.mktemp("drafts")
    return {
        "target": tiny_model_dir("llama"),
        "small": _save_llama(
            root / "small", 5, num_hidden_layers=1, hidden_size=32, intermediate_size=64
        ),
        "other": build_tiny("llama", root / "other", seed=1),
        "vocab256": _save_llama(root / "vocab256", 6, vocab_size=256),
        "short": _save_llama(root / "short", 7, max_position_embeddings=64),
    }


def _spec(models, kind: str, k: int = 3) -> dict:
    if kind == "self":  # the target drafting for itself: the upper bound on acceptance
        return {
            "method": "draft_model",
            "model": str(models["target"]),
            "num_speculative_tokens": k,
        }
    if kind == "early-exit":  # vLLM's older shape (no method), graphwise's layer cut
        return {"model": str(models["target"]), "num_speculative_tokens": k, "num_layers": 1}
    return {"method": "draft_model", "model": str(models[kind]), "num_speculative_tokens": k}


def _check_stats(engine) -> None:
    """The counters agree with each other; every KV block is back."""
    stats = engine.get_stats()
    per_pos = engine.scheduler.spec_stats.accepted_per_pos
    assert stats.spec_decode_num_drafts > 0
    assert 0 <= stats.spec_decode_num_accepted_tokens <= stats.spec_decode_num_draft_tokens
    assert sum(per_pos) == stats.spec_decode_num_accepted_tokens
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:], strict=False))
    assert stats.kv_blocks_used == 0


# ---- configuration --------------------------------------------------------------------------
def test_config_shapes_and_errors(tmp_path):
    path = str(tmp_path)
    spec = EngineConfig(
        speculative_config={"method": "draft_model", "model": path, "num_speculative_tokens": 2}
    ).speculative
    assert spec == SpeculativeConfig("draft_model", 2, model=path) and spec.uses_draft_model
    # vLLM's older shape: a model and no method is a draft model; "[ngram]" is prompt lookup.
    assert EngineConfig(
        speculative_config={"model": path, "num_speculative_tokens": 2}
    ).speculative == SpeculativeConfig("draft_model", 2, model=path)
    assert EngineConfig(
        speculative_config={"model": "[ngram]", "num_speculative_tokens": 2}
    ).speculative == SpeculativeConfig("ngram", 2)
    bad = [
        ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model is"),
        ({"method": "draft_model", "model": "", "num_speculative_tokens": 2}, "model is required"),
        ({"num_speculative_tokens": 2}, "method is required"),
        ({"model": path}, "num_speculative_tokens is required"),
        (
            {
                "method": "draft_model",
                "model": path,
                "num_speculative_tokens": 2,
                "prompt_lookup_max": 3,
            },
            "prompt_lookup_max applies to method 'ngram' only",
        ),  # fmt: skip
        (
            {"method": "ngram", "num_speculative_tokens": 2, "num_layers": 3},
            "num_layers applies to method 'draft_model' only",
        ),
        (
            {"method": "draft_model", "model": path, "num_speculative_tokens": 2, "num_layers": 0},
            "num_layers must be a positive integer",
        ),
        ({"method": "eagle3", "model": path, "num_speculative_tokens": 2}, "not supported yet"),
        ({"method": "medusa", "num_speculative_tokens": 2}, "not supported yet"),
    ]
    for value, needle in bad:
        with pytest.raises(ValueError, match=needle):
            EngineConfig(speculative_config=value)


def test_cli_flag_takes_a_draft_model(tmp_path):
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    value = {"method": "draft_model", "model": str(tmp_path), "num_speculative_tokens": 4}
    args = parser.parse_args(["--speculative-config", json.dumps(value)])
    from graphwise.config import engine_config_from_args

    spec = engine_config_from_args(args).speculative
    assert (spec.method, spec.model, spec.num_speculative_tokens) == (
        "draft_model",
        str(tmp_path),
        4,
    )


def test_bad_draft_models_are_refused_clearly(models, tmp_path):
    target = str(models["target"])

    def start(spec, **kw):
        return LLM(model=target, speculative_config=spec, **kw)

    with pytest.raises(ValueError, match=r"vocabulary of 256 tokens, the target model 512"):
        start(_spec(models, "vocab256"))
    with pytest.raises(ValueError, match=r"speculative_config.model: model path .* not exist"):
        start(
            {"method": "draft_model", "model": str(tmp_path / "nope"), "num_speculative_tokens": 2}
        )
    with pytest.raises(ValueError, match=r"num_layers \(5\) exceeds the draft model's 2 layers"):
        start({"model": target, "num_speculative_tokens": 2, "num_layers": 5})
    with pytest.raises(ValueError, match=r"max_model_len \(128\) exceeds the draft model's"):
        start(_spec(models, "short"), max_model_len=128)
    # Without max_model_len the engine serves what both models reach.
    assert start(_spec(models, "short")).llm_engine.max_model_len == 64


def test_a_draft_with_another_tokenizer_is_refused(tiny_chat_dir, tmp_path):
    """Same vocabulary size, other ids: a draft must share the target's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_dir)
    vocab = tok.get_vocab()
    # Swap two ids: the same size, a different tokenizer.
    a, b = sorted(vocab, key=vocab.get)[100:102]
    data = json.loads((Path(tiny_chat_dir) / "tokenizer.json").read_text())
    model_vocab = data["model"]["vocab"]
    model_vocab[a], model_vocab[b] = model_vocab[b], model_vocab[a]
    draft = tmp_path / "draft"
    draft.mkdir()
    for f in Path(tiny_chat_dir).iterdir():
        if f.name != "tokenizer.json":
            (draft / f.name).write_bytes(f.read_bytes())
    (draft / "tokenizer.json").write_text(json.dumps(data))
    assert AutoTokenizer.from_pretrained(draft).get_vocab() != vocab
    spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="another tokenizer than the target"):
        LLM(model=str(tiny_chat_dir), speculative_config=spec)


def test_memory_plan_prices_a_block_for_both_models(models):
    """One block id holds the target's KV and the draft's: the same KV budget holds fewer
    blocks, by the ratio of bytes per token; a draft with its own weights counts them."""
    kv = 1 << 20
    plain = LLM(model=str(models["target"]), kv_cache_memory=kv).llm_engine
    for kind in ("self", "small"):
        engine = LLM(
            model=str(models["target"]), kv_cache_memory=kv, speculative_config=_spec(models, kind)
        ).llm_engine
        runner = engine.executor.driver
        target_bytes = plain.executor.driver.kv_bytes_per_token()
        draft_bytes = runner.drafter.kv_bytes_per_token()
        assert runner.kv_bytes_per_token() == target_bytes + draft_bytes
        plan = engine.memory_plan
        assert plan.num_blocks == kv // ((target_bytes + draft_bytes) * 16)
        assert plan.draft_block_bytes == draft_bytes * 16
        # the draft's caches have the target's block count (and a scratch block)
        assert runner.drafter.kv_caches[0][0].shape[0] == plan.num_blocks + 1
        if kind == "self":
            assert runner.drafter.model is runner.model and plan.draft_weights_bytes == 0
            assert draft_bytes == target_bytes
        else:
            assert plan.draft_weights_bytes > 0
            assert plan.weights_bytes == plain.memory_plan.weights_bytes + plan.draft_weights_bytes


# ---- greedy: identical tokens ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["self", "small", "early-exit"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_greedy_with_a_draft_model_equals_plain_and_hf(models, kind, async_scheduling):
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kw = dict(async_scheduling=async_scheduling)
    plain_engine, plain = _generate(models["target"], None, params, prompts, **kw)
    engine, spec = _generate(models["target"], _spec(models, kind), params, prompts, **kw)
    assert spec == plain
    if kind == "self" and not async_scheduling:
        assert [t for t, _ in spec] == hf_greedy(models["target"], prompts, 24)
    _check_stats(engine)
    stats = engine.get_stats()
    if kind == "self":
        # The draft is the target on its own KV cache: every draft is the target's argmax, so
        # any stale draft KV (a missed catch-up, a wrong slot) would show as a rejection.
        assert stats.spec_decode_acceptance_rate == 1.0
        assert stats.steps < plain_engine.get_stats().steps / 2


def _mixed_params(n: int) -> list[SamplingParams]:
    """Different lengths, stop tokens, min_tokens, EOS, a 1-token request."""
    out = []
    for i in range(n):
        kind = i % 5
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
        elif kind == 3:
            out.append(SamplingParams(temperature=0, max_tokens=1 + i % 3, ignore_eos=True))
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
@pytest.mark.parametrize("kind", ["self", "small"])
def test_stops_and_limits_with_a_draft_model(models, engine_kw, kind):
    prompts = _prompts(1) + _prompts(2)
    params = _mixed_params(len(prompts))
    _, plain = _generate(models["target"], None, params, prompts, **engine_kw)
    engine, spec = _generate(models["target"], _spec(models, kind), params, prompts, **engine_kw)
    assert spec == plain
    for (tokens, reason), p, prompt in zip(spec, params, prompts, strict=True):
        assert len(tokens) <= p.max_tokens
        assert len(prompt) + len(tokens) <= engine.max_model_len
        if reason == "stop":
            assert len(tokens) >= p.min_tokens and tokens[-1] in p.stop_token_ids
            assert not any(t in p.stop_token_ids for t in tokens[p.min_tokens : -1])
    _check_stats(engine)
    stats = engine.get_stats()
    if "num_gpu_blocks_override" in engine_kw:
        assert stats.num_preemptions > 0
    if kind == "self":
        assert stats.spec_decode_acceptance_rate == 1.0  # also across preemption and chunks


def test_prefix_cached_blocks_carry_the_drafts_kv(models):
    """Continuations of earlier outputs take the blocks that earlier steps (prefill, plain
    decode and verify steps) filled: with the target drafting for itself every draft is still
    accepted, so the draft's KV in those blocks is right; tokens equal an engine's without
    speculation or prefix caching."""
    prompts = _prompts(6)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = LLM(model=str(models["target"]), speculative_config=_spec(models, "self"), block_size=8)
    first = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    follow = [p + o.outputs[0].token_ids for p, o in zip(prompts, first, strict=True)]
    engine = llm.llm_engine
    hits = engine.block_manager.prefix_hits
    again = llm.generate([{"prompt_token_ids": p} for p in follow], params, use_tqdm=False)
    assert engine.block_manager.prefix_hits - hits >= len(prompts) * 5
    assert engine.get_stats().spec_decode_acceptance_rate == 1.0
    _check_stats(engine)
    _, plain = _generate(models["target"], None, params, follow, enable_prefix_caching=False)
    assert [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in again] == plain


def test_requests_that_cannot_speculate_run_beside_a_draft_model(models):
    """prompt logprobs, penalties and n > 1 decode plainly in the same batches as verify rows (the
    draft mirrors their rows too) and equal the plain engine's outputs."""
    prompts = _prompts()
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=2),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(n=2, temperature=0, max_tokens=8, ignore_eos=True),
    ]
    llms = [
        LLM(model=str(models["target"]), speculative_config=spec)
        for spec in (None, _spec(models, "small"))
    ]
    outs = []
    for llm in llms:
        got = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        outs.append([[c.token_ids for c in o.outputs] for o in got])
    assert outs[0] == outs[1]
    stats = llms[1].llm_engine.get_stats()
    assert stats.spec_decode_num_drafts > 0 and stats.kv_blocks_used == 0


def test_stop_strings_with_a_draft_model(tiny_chat_dir):
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat"
    spec = {"method": "draft_model", "model": str(tiny_chat_dir), "num_speculative_tokens": 4}
    outs = {}
    for s in (None, spec):
        llm = LLM(model=str(tiny_chat_dir), speculative_config=s, max_model_len=512)
        text = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[
            0
        ].outputs[0]
        outs[s is not None] = text.token_ids
        assert len(text.text) > 12
        at = len(text.text) * 2 // 3  # late: inside what a verify step's drafts cover
        stop = text.text[at : at + 5]
        got = llm.generate(
            prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop]), use_tqdm=False
        )[0].outputs[0]
        assert got.finish_reason == "stop" and got.text == text.text[: text.text.index(stop)]
        outs[(s is not None, "stop")] = got.token_ids
        assert llm.llm_engine.get_stats().kv_blocks_used == 0
    assert outs[True] == outs[False]
    assert outs[(True, "stop")] == outs[(False, "stop")]


def test_abort_mid_speculation_frees_every_block(models):
    llm = LLM(model=str(models["target"]), speculative_config=_spec(models, "small"))
    engine = llm.llm_engine
    free_at_start = engine.block_manager.num_free_blocks
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    ids = [engine.add_request(None, params, prompt_token_ids=p) for p in _prompts(3)]
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
    # and the engine serves on, drafts and all
    out = llm.generate({"prompt_token_ids": _prompts(4)[0]}, params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 200
    assert engine.block_manager.num_free_blocks == free_at_start


def test_a_failed_verify_step_rolls_back_and_the_others_recompute(models, monkeypatch):
    """A draft-model verify step that fails to launch: the request blamed fails alone, the
    others recompute (their draft KV with them) and finish with the tokens they would have had."""
    engine = check_failed_verify_step(models["target"], _spec(models, "self"), monkeypatch)
    assert engine.get_stats().spec_decode_acceptance_rate == 1.0


# ---- sampling -------------------------------------------------------------------------------
def _tv(counts: np.ndarray, p: np.ndarray) -> float:
    return 0.5 * float(np.abs(counts / counts.sum() - p).sum())


def _chi2_pvalue(counts: np.ndarray, p: np.ndarray) -> float:
    """Pearson's chi-square test of counts against p (sf(x) = Q(df / 2, x / 2))."""
    keep = p > 0
    assert counts[~keep].sum() == 0, "a token the target never samples"
    expected = p[keep] * counts.sum()
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(stat / 2)))


def _verify_with_q(p_logits, q_logits, temperature, top_k, trials, seed, use_q=True):
    """`trials` rows each verify 2 drafts drawn from q (q_logits [2, V] under temperature and
    top_k, as a draft model draws them) against the target's p_logits [3, V]."""
    vocab = p_logits.shape[1]
    gen = torch.Generator().manual_seed(seed)

    def dist(logits):
        masked = logits.clone()
        masked[masked < masked.topk(top_k).values[-1]] = float("-inf")
        return torch.softmax(masked / temperature, -1)

    q = torch.stack([dist(q_logits[0]), dist(q_logits[1])])
    d1 = torch.multinomial(q[0], trials, replacement=True, generator=gen)
    d2 = torch.multinomial(q[1], trials, replacement=True, generator=gen)
    draft_ids = torch.stack([d1, d2], 1).reshape(-1)
    bonus = torch.multinomial(dist(p_logits[2]), trials, replacement=True, generator=gen)
    t = SamplingTensors(
        temperature=torch.full((trials,), temperature),
        top_k=torch.full((trials,), top_k),
        top_p=torch.ones(trials),
        all_greedy=False,
        any_top_k_top_p=top_k < vocab,
        generators=[None] * trials,
    )
    out, _ = verify_drafts(
        p_logits[:2].repeat(trials, 1),
        draft_ids,
        torch.arange(2 * trials),
        [2] * trials,
        torch.full((trials,), 2),
        bonus,
        t,
        gen,
        q.repeat(trials, 1) if use_q else None,
    )
    return out, [dist(p_logits[i]).double().numpy() for i in range(3)]


def test_rejection_sampling_with_draft_probabilities_keeps_the_target_distribution():
    """Drafts drawn from q (near p, but with tokens p never samples under its top-k and the
    other way round): the first emitted token follows p0, the second (when the first draft was
    accepted) p1, the third (both accepted) p2. The deterministic-draft rule is exact for
    sampled drafts too (it holds given any draft) but accepts less: the reason to carry q.
    200,000 rows, fixed seed."""
    vocab, temperature, top_k, trials = 10, 0.8, 6, 200_000
    torch.manual_seed(5)
    p_logits = torch.randn(3, vocab) * 1.5
    q_logits = p_logits[:2] + torch.randn(2, vocab)
    accepted = {}
    for use_q in (True, False):
        out, p = _verify_with_q(p_logits, q_logits, temperature, top_k, trials, 1, use_q)
        first = np.bincount(out[:, 0].numpy(), minlength=vocab)
        second = np.bincount(out[out[:, 1] >= 0][:, 1].numpy(), minlength=vocab)
        third = np.bincount(out[out[:, 2] >= 0][:, 2].numpy(), minlength=vocab)
        accepted[use_q] = int((out[:, 1] >= 0).sum())
        assert 0.2 * trials < accepted[use_q] < 0.9 * trials  # both paths well exercised
        for counts, dist in ((first, p[0]), (second, p[1]), (third, p[2])):
            assert counts.sum() > 20000
            assert _tv(counts, dist) < (vocab / counts.sum()) ** 0.5
            assert _chi2_pvalue(counts, dist) > 1e-4
    assert accepted[True] > 1.3 * accepted[False]


def test_a_wrong_rule_for_sampled_drafts_is_caught():
    """The same statistics reject a sampler that accepts with min(1, p / q) but then resamples
    from p rather than from max(0, p - q): the test above would fail on it."""
    vocab, temperature, top_k, trials = 10, 0.8, 6, 200_000
    torch.manual_seed(5)
    p_logits = torch.randn(3, vocab) * 1.5
    q_logits = p_logits[:2] + torch.randn(2, vocab)
    _, (p0, _, _) = _verify_with_q(p_logits, q_logits, temperature, top_k, 10, 1)
    masked = q_logits[0].clone()
    masked[masked < masked.topk(top_k).values[-1]] = float("-inf")
    q0 = torch.softmax(masked / temperature, -1).double()
    gen = torch.Generator().manual_seed(2)
    d = torch.multinomial(q0, trials, replacement=True, generator=gen)
    p0_t = torch.from_numpy(p0)
    accept = torch.rand(trials, generator=gen, dtype=torch.float64) * q0[d] < p0_t[d]
    resample = torch.multinomial(p0_t, trials, replacement=True, generator=gen)
    counts = np.bincount(torch.where(accept, d, resample).numpy(), minlength=vocab)
    assert _tv(counts, p0) > 3 * (vocab / counts.sum()) ** 0.5
    assert _chi2_pvalue(counts, p0) < 1e-10


@pytest.mark.slow
def test_sampled_outputs_follow_the_target_distribution_end_to_end(models):
    """3,000 requests, temperature 0.8 and top-k 5, drafted by the target's first layer (its
    top-k differs from the target's: ~85% of drafts are rejected and resampled): the second
    output token (the first a verify step emits) given the most frequent first token, and the
    third given the most frequent first two, follow the target's distribution computed by HF
    transformers on the same weights."""
    prompt = [11, 22, 33, 44, 55, 66, 77, 88]
    params = SamplingParams(temperature=0.8, top_k=5, max_tokens=4, ignore_eos=True)
    llm = LLM(
        model=str(models["target"]),
        speculative_config=_spec(models, "early-exit", k=3),
        max_num_seqs=512,
    )
    outs = llm.generate([{"prompt_token_ids": prompt}] * 3000, params, use_tqdm=False)
    tokens = [tuple(o.outputs[0].token_ids) for o in outs]
    engine = llm.llm_engine
    _check_stats(engine)
    stats = engine.get_stats()
    assert 0.05 < stats.spec_decode_acceptance_rate < 0.95
    hf = hf_reference(models["target"])

    def target_dist(context):
        with torch.no_grad():
            logits = hf(torch.tensor([context])).logits[0, -1].float()
        masked = logits.clone()
        masked[masked < masked.topk(5).values[-1]] = float("-inf")
        return torch.softmax(masked / 0.8, -1).double().numpy()

    t1 = Counter(t[0] for t in tokens).most_common(1)[0][0]
    second = np.bincount([t[1] for t in tokens if t[0] == t1], minlength=512)
    t2 = Counter(t[1] for t in tokens if t[0] == t1).most_common(1)[0][0]
    third = np.bincount([t[2] for t in tokens if t[:2] == (t1, t2)], minlength=512)
    for counts, context in ((second, prompt + [t1]), (third, prompt + [t1, t2])):
        p = target_dist(context)
        assert counts.sum() > 150
        assert _chi2_pvalue(counts, p) > 1e-4
        assert _tv(counts, p) < 2 * (5 / counts.sum()) ** 0.5


def test_random_path_with_top_k_1_equals_greedy(models):
    """temperature 1 with top_k=1: drafts are drawn from the draft's q (one-hot at its argmax)
    and verified by the rejection sampler against a one-hot p: the tokens must be greedy's,
    which checks that each draft and each q are verified at the right position."""
    prompts = _prompts(5)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    top1 = SamplingParams(temperature=1.0, top_k=1, max_tokens=20, ignore_eos=True, seed=3)
    _, plain = _generate(models["target"], None, greedy, prompts)
    for kind in ("self", "small"):
        engine, spec = _generate(models["target"], _spec(models, kind), top1, prompts)
        assert spec == plain
        _check_stats(engine)


def test_seeded_sampling_with_a_draft_model_is_reproducible(models):
    prompts = _prompts()
    params = [
        SamplingParams(temperature=0.7, seed=11 + i, max_tokens=20, ignore_eos=True)
        for i in range(4)
    ]
    runs = []
    for async_scheduling in (False, True, False):
        engine, out = _generate(
            models["target"],
            _spec(models, "small"),
            params,
            prompts,
            async_scheduling=async_scheduling,
        )
        runs.append(out)
        _check_stats(engine)
    assert runs[0] == runs[1] == runs[2]
