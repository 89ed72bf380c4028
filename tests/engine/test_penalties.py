"""Penalties and filters (issue 15) against HF transformers on the same weights: repetition as
HF's own generate applies it, presence/frequency/min_p/logit_bias/allowed_token_ids against a
reference written here on HF's logits; async scheduling (the newest token known only on the
device), preemption and chunked prefill change nothing."""

from __future__ import annotations

import pytest
import torch

from graphwise import LLM, SamplingParams
from graphwise.engine.validation import InvalidRequest
from tests.conftest import hf_reference

PROMPTS = [[5, 9, 13, 2, 77, 5, 9], [100, 3, 3, 41], [7, 8] * 6]
N = 10


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def hf(model_dir):
    return hf_reference(model_dir)


def _generate(llm: LLM, params: SamplingParams, prompts=PROMPTS) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _reference(hf, prompt: list[int], steps: int, process) -> list[int]:
    """Greedy decoding on HF's logits, each step's logits passed through `process(logits,
    generated)` first."""
    tokens = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = hf(torch.tensor([tokens])).logits[0, -1].float()
        tokens.append(int(process(logits, tokens[len(prompt) :]).argmax()))
    return tokens[len(prompt) :]


def test_repetition_penalty_equals_hf_generate(model_dir, hf):
    llm = LLM(model=str(model_dir))
    got = _generate(llm, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True,
                                        repetition_penalty=1.8))  # fmt: skip
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=N, min_new_tokens=N,
                              do_sample=False, repetition_penalty=1.8, pad_token_id=0)  # fmt: skip
        assert tokens == ref[0, len(prompt) :].tolist()
    plain = _generate(llm, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True))
    assert plain != got  # the penalty changed something on these prompts


def test_presence_and_frequency_penalties_count_generated_tokens(model_dir, hf):
    pres, freq = 1.5, 0.7

    def penalize(logits: torch.Tensor, counted: list[int]) -> torch.Tensor:
        counts = torch.bincount(torch.tensor(counted, dtype=torch.long),
                                minlength=logits.shape[0]).float()  # fmt: skip
        return logits - freq * counts - pres * (counts > 0).float()

    # Prompts holding the tokens the model likes next: counting the prompt too (the wrong
    # rule) would change the answer, as the last assertion checks.
    llm = LLM(model=str(model_dir))
    liked = _generate(llm, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    prompts = [p + extra for p, extra in zip(PROMPTS, liked, strict=True)]
    want = [_reference(hf, p, N, penalize) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True,
                            presence_penalty=pres, frequency_penalty=freq)  # fmt: skip
    for async_scheduling in (True, False):
        llm = LLM(model=str(model_dir), async_scheduling=async_scheduling)
        assert _generate(llm, params, prompts) == want, async_scheduling
    wrong = [_reference(hf, p, N, lambda lg, gen, p=p: penalize(lg, p + gen)) for p in prompts]
    assert wrong != want


def test_penalties_survive_preemption_and_chunked_prefill(model_dir):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                            repetition_penalty=1.4, frequency_penalty=0.5)  # fmt: skip
    roomy = _generate(LLM(model=str(model_dir), block_size=8), params)
    tight = LLM(model=str(model_dir), block_size=8, num_gpu_blocks_override=10,
                max_num_batched_tokens=8, max_model_len=64)  # fmt: skip
    assert _generate(tight, params) == roomy
    assert tight.llm_engine.scheduler.num_preemptions > 0


def test_min_p_one_is_greedy_and_logit_bias_forces_a_token(model_dir):
    llm = LLM(model=str(model_dir))
    greedy = _generate(llm, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True))
    hot = SamplingParams(temperature=1.3, min_p=1.0, seed=3, max_tokens=N, ignore_eos=True)
    assert _generate(llm, hot) == greedy
    forced = SamplingParams(temperature=0.9, seed=4, max_tokens=N, ignore_eos=True,
                            logit_bias={321: 100.0})  # fmt: skip
    assert _generate(llm, forced) == [[321] * N] * len(PROMPTS)


def test_allowed_token_ids_keep_the_best_allowed_token(model_dir, hf):
    allowed = [3, 17, 64, 250, 511]

    def restrict(logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        keep = torch.full_like(logits, float("-inf"))
        keep[allowed] = logits[allowed]
        return keep

    llm = LLM(model=str(model_dir))
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True,
                            allowed_token_ids=allowed)  # fmt: skip
    got = _generate(llm, params)
    assert got == [_reference(hf, p, N, restrict) for p in PROMPTS]
    sampled = SamplingParams(temperature=1.5, seed=1, max_tokens=N, ignore_eos=True,
                             allowed_token_ids=allowed)  # fmt: skip
    assert all(t in allowed for ts in _generate(llm, sampled) for t in ts)


def test_processed_rows_leave_their_batch_neighbours_alone(model_dir):
    llm = LLM(model=str(model_dir))
    seeded = SamplingParams(temperature=0.8, seed=9, max_tokens=N, ignore_eos=True)
    alone = _generate(llm, seeded, PROMPTS[:1])
    mixed = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS],
        [seeded, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, logit_bias={9: 50}),
         SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, repetition_penalty=2.0)],
        use_tqdm=False,
    )  # fmt: skip
    assert mixed[0].outputs[0].token_ids == alone[0]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"logit_bias": {"7": 1.0}}, "logit_bias"),
        ({"logit_bias": {7: float("nan")}}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_ids_outside_the_vocabulary_are_refused_at_admission(model_dir):
    engine = LLM(model=str(model_dir)).llm_engine
    for params, field in [
        (SamplingParams(logit_bias={512: 1.0}), "logit_bias"),
        (SamplingParams(allowed_token_ids=[1, -2]), "allowed_token_ids"),
    ]:
        with pytest.raises(InvalidRequest, match=field) as e:
            engine.add_request(None, params, prompt_token_ids=[1, 2])
        assert e.value.param == field


def _round_trips(tok, ids: list[int]) -> str | None:
    text = tok.decode(ids)
    return text if text.strip() and tok.encode(text, add_special_tokens=False) == ids else None


def test_bad_words_are_never_completed(tiny_chat_llm):
    """A word of one token is banned outright; a word of two tokens only where its first token
    was just generated: the output is the same up to there, then differs."""
    llm = tiny_chat_llm
    tok = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = llm.generate("The sun is", greedy, use_tqdm=False)[0].outputs[0].token_ids
    pair = next((i for i in range(1, len(plain) - 1) if _round_trips(tok, plain[i : i + 2])), None)
    assert pair is not None, "no two-token word in the greedy output"
    word = _round_trips(tok, plain[pair : pair + 2])
    banned = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=[word])
    out = llm.generate("The sun is", banned, use_tqdm=False)[0].outputs[0].token_ids
    assert out[: pair + 1] == plain[: pair + 1] and out[pair + 1] != plain[pair + 1]
    sequences = [tok.encode(w, add_special_tokens=False) for w in (word, " " + word)]
    for seq in sequences:
        n = len(seq)
        assert all(out[i : i + n] != seq for i in range(len(out) - n + 1))
    single = _round_trips(tok, plain[:1])
    if single is not None and len(tok.encode(single, add_special_tokens=False)) == 1:
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=[single])
        first = llm.generate("The sun is", params, use_tqdm=False)[0].outputs[0].token_ids
        assert plain[0] not in first


def test_include_stop_str_in_output(tiny_chat_llm):
    greedy = dict(temperature=0, max_tokens=24, ignore_eos=True)
    full = tiny_chat_llm.generate("The sun is", SamplingParams(**greedy), use_tqdm=False)
    text = full[0].outputs[0].text
    stop = text[6:9]
    cut, kept = (
        tiny_chat_llm.generate(
            "The sun is",
            SamplingParams(**greedy, stop=[stop], include_stop_str_in_output=include),
            use_tqdm=False,
        )[0].outputs[0]
        for include in (False, True)
    )
    assert cut.text == text[: text.index(stop)]
    assert kept.text == text[: text.index(stop) + len(stop)] and kept.stop_reason == stop
