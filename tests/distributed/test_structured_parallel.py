"""Structured output under tensor, pipeline and data parallelism (issue 20): with TP=2 the
deferred sampling of constrained rows (async scheduling) is a call every rank joins
(`sample_deferred`); with PP=2 micro-batches fill every mask at schedule time (a batch never
takes a token in flight); with DP=2 each replica compiles its own grammars and a bad
constraint is refused by the front. Same tokens as one engine."""

from __future__ import annotations

import re

import pytest

from graphwise import SamplingParams, StructuredOutputsParams
from graphwise.engine.validation import InvalidRequest

pytestmark = pytest.mark.slow
pytest.importorskip("xgrammar")

REGEX = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"
PROMPTS = ["Email:", "Pick one.", "Hello there", "Contact:"]


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=30,
                       structured_outputs=StructuredOutputsParams(regex=REGEX)),
        SamplingParams(temperature=1.0, seed=5, max_tokens=10,
                       structured_outputs=StructuredOutputsParams(choice=["yes", "no"])),
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=1.0, seed=2, max_tokens=30,
                       structured_outputs=StructuredOutputsParams(regex=REGEX)),
    ]  # fmt: skip


def _tokens(llm) -> list[list[int]]:
    outs = llm.generate(PROMPTS, _params(), use_tqdm=False)
    for o, p in zip(outs, _params(), strict=True):
        so = p.structured_outputs
        if so is not None and so.regex:
            assert re.fullmatch(REGEX, o.outputs[0].text), o.outputs[0].text
        elif so is not None:
            assert o.outputs[0].text in so.choice
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize(
    "options",
    [dict(tensor_parallel_size=2), dict(data_parallel_size=2), dict(pipeline_parallel_size=2)],
)
def test_constrained_outputs_match_one_engine(make_llm, tiny_chat_dir, options):
    ref = _tokens(make_llm(tiny_chat_dir))
    llm = make_llm(tiny_chat_dir, **options)
    assert _tokens(llm) == ref
    with pytest.raises(InvalidRequest) as info:
        llm.llm_engine.add_request(
            "x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="a(b"))
        )
    assert info.value.param == "structured_outputs"
