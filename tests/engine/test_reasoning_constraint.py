"""Structured output after the reasoning (issue 20 item 4): a constrained request whose output
reasons first (`SamplingParams.reasoning`) is free until the end marker's tokens, and the
constraint holds from the next token on.

The phase logic is tested on token ids (one-token and several-token markers, a marker that
overlaps itself, Qwen3's optional start and its mask). End to end on the tiny chat model, whose
tokenizer (SmolLM2's) writes `</think>` as three tokens: the sampling is restricted to those
three, two digits and EOS (the random model then writes the marker by chance, in order, within
a few dozen tokens; the seeds are ones where it does), and the answer must match a digits regex that forbids every marker
token. With the constraint on the whole output the marker could never be written; with it
never starting, the answer would hold marker tokens."""

from __future__ import annotations

import re

import numpy as np
import pytest

from graphwise import LLM, ReasoningSpec, SamplingParams, StructuredOutputsParams
from graphwise.engine.reasoning import ReasoningPhase, adjust_masks
from graphwise.engine.validation import InvalidRequest
from graphwise.server.reasoning import make_reasoning_parser

pytest.importorskip("xgrammar")


# ---- the phase, on token ids ---------------------------------------------------------------
def test_inside_until_the_end_marker_then_the_answer() -> None:
    phase = ReasoningPhase(ReasoningSpec(end_token_ids=(7, 7, 9)))
    assert not phase.follows_grammar
    # 7 7 7 9: the marker overlaps itself; it is found where it ends
    for token in (1, 7, 9, 7, 7, 7):
        assert phase.take(token) and not phase.follows_grammar
    assert phase.take(9)  # the marker's last token is the reasoning's
    assert phase.follows_grammar
    assert not phase.take(7) and not phase.take(9)  # the answer's: the matcher takes them


def test_one_token_marker() -> None:
    phase = ReasoningPhase(ReasoningSpec(end_token_ids=(5,)))
    assert phase.take(4) and phase.take(5) and phase.follows_grammar
    assert not phase.take(5)


def test_optional_start_opens_only_at_the_first_token() -> None:
    spec = ReasoningSpec(end_token_ids=(9,), start_token_ids=(3, 4), start="optional")
    plain = ReasoningPhase(spec)
    assert plain.follows_grammar  # the first token: the grammar's mask (plus the marker's)
    assert not plain.take(8)  # not the marker: the answer began
    assert plain.follows_grammar and not plain.take(3)  # later markers are the answer's
    opening = ReasoningPhase(spec)
    assert opening.take(3) and not opening.follows_grammar  # a begun marker is completed
    assert opening.take(4) and not opening.follows_grammar  # inside now
    assert opening.take(3) and opening.take(9) and opening.follows_grammar


def test_masks_by_phase() -> None:
    spec = ReasoningSpec(end_token_ids=(9,), start_token_ids=(63, 31), start="optional")

    class Grammar:  # what adjust_masks reads of a RequestGrammar
        def __init__(self, phase: ReasoningPhase | None) -> None:
            self.reasoning = phase

    first, begun, inside = ReasoningPhase(spec), ReasoningPhase(spec), ReasoningPhase(spec)
    begun.take(63)
    inside.take(63), inside.take(31)
    grammar_row = np.array([0b101, 0], dtype=np.int32)  # the grammar allows tokens 0 and 2
    mask = np.stack([grammar_row] * 4 + [np.full(2, -1, dtype=np.int32)])
    adjust_masks([Grammar(first), Grammar(begun), Grammar(None), None, Grammar(inside)], mask)

    def allowed(row: np.ndarray) -> list[int]:
        return [t for t in range(64) if (int(row[t // 32]) >> (t % 32)) & 1]

    assert allowed(mask[0]) == [0, 2, 63]  # the grammar's and the marker's first token
    assert allowed(mask[1]) == [31]  # the marker's next token alone (bit 31: the sign bit)
    assert allowed(mask[2]) == allowed(mask[3]) == [0, 2]  # no phase / ended: as filled
    assert allowed(mask[4]) == list(range(64))  # inside: not filled, no mask


def test_spec_is_checked() -> None:
    with pytest.raises(ValueError, match="end_token_ids must not be empty"):
        ReasoningSpec(end_token_ids=())
    with pytest.raises(ValueError, match="needs start_token_ids"):
        ReasoningSpec(end_token_ids=(1,), start="optional")
    with pytest.raises(ValueError, match="reasoning.start"):
        ReasoningSpec(end_token_ids=(1,), start="sometimes")
    p = SamplingParams(reasoning={"end_token_ids": [4, 5]})
    assert p.reasoning == ReasoningSpec(end_token_ids=(4, 5))


# ---- end to end ----------------------------------------------------------------------------
REGEX = "[12]{4}"
SEEDS = (4, 5, 6, 11)  # seeds whose samples write the marker within 40 tokens (keeps it quick)


@pytest.fixture(scope="module")
def sync_llm(tiny_chat_dir):
    return LLM(model=str(tiny_chat_dir), max_num_seqs=8, max_model_len=1024,
               async_scheduling=False)  # fmt: skip


def _params(tok, seeds, reasoning: bool) -> list[SamplingParams]:
    parser = make_reasoning_parser("deepseek_r1")
    spec = parser.spec(tok, "inside")
    assert spec is not None and len(spec.end_token_ids) == 3  # `</`, `think`, `>`
    marker = spec.end_token_ids
    one, two = (tok.encode(d, add_special_tokens=False)[0] for d in "12")
    eos = tok.eos_token_id
    return [
        SamplingParams(
            temperature=1.0,
            seed=seed,
            max_tokens=60,
            allowed_token_ids=[*marker, one, two, eos],
            # EOS never in the reasoning; at the answer's end it is all the grammar allows
            logit_bias={**dict.fromkeys(marker, 1.0), eos: -100.0},
            structured_outputs=StructuredOutputsParams(regex=REGEX),
            reasoning=spec if reasoning else None,
        )
        for seed in seeds
    ]


def test_constraint_starts_after_a_multi_token_end_marker(tiny_chat_llm) -> None:
    tok = tiny_chat_llm.get_tokenizer()
    parser = make_reasoning_parser("deepseek_r1")
    params = _params(tok, SEEDS, reasoning=True)
    outs = tiny_chat_llm.generate(["Think, then answer:"] * 4, params, use_tqdm=False)
    answered = 0
    for out in outs:
        c = out.outputs[0]
        reasoning, content = parser.split(c.text)
        if c.finish_reason == "length":  # never wrote the marker: all of it is reasoning
            assert content is None and "</think>" not in c.text
            continue
        assert c.finish_reason == "stop", c
        assert re.fullmatch(REGEX, content or ""), c.text
        assert "think" in reasoning  # tokens the regex forbids: the reasoning was free
        answered += 1
    assert answered >= 3
    # Without the reasoning spec the constraint holds from the first token: digits only.
    plain = tiny_chat_llm.generate(
        ["Think, then answer:"] * 2, _params(tok, range(2), reasoning=False), use_tqdm=False
    )
    for out in plain:
        assert re.fullmatch(REGEX, out.outputs[0].text), out.outputs[0].text


@pytest.mark.slow
def test_async_and_sync_scheduling_agree(tiny_chat_llm, sync_llm) -> None:
    """With async scheduling the mask of a row whose marker's last token is still being
    sampled waits for it (deferred sampling); without, masks are filled before each step."""
    params = _params(tiny_chat_llm.get_tokenizer(), SEEDS, reasoning=True)
    a = tiny_chat_llm.generate(["Think, then answer:"] * 4, params, use_tqdm=False)
    b = sync_llm.generate(["Think, then answer:"] * 4, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert any(o.outputs[0].finish_reason == "stop" for o in a)


@pytest.mark.slow
def test_n_samples_each_have_their_phase(tiny_chat_llm) -> None:
    tok = tiny_chat_llm.get_tokenizer()
    (params,) = _params(tok, [SEEDS[0]], reasoning=True)
    params.n = 3
    (out,) = tiny_chat_llm.generate(["Think, then answer:"], params, use_tqdm=False)
    parser = make_reasoning_parser("deepseek_r1")
    assert len(out.outputs) == 3
    for c in out.outputs:
        if c.finish_reason == "stop":
            assert re.fullmatch(REGEX, parser.split(c.text)[1] or ""), c.text


def test_reasoning_ids_are_checked_at_admission(tiny_chat_llm) -> None:
    vocab = tiny_chat_llm.llm_engine.model_config.vocab_size
    params = SamplingParams(
        structured_outputs=StructuredOutputsParams(regex="a"),
        reasoning=ReasoningSpec(end_token_ids=(vocab,)),
    )
    with pytest.raises(InvalidRequest, match="reasoning"):
        tiny_chat_llm.llm_engine.add_request("hi", params)
