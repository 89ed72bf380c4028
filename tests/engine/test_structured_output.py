"""Structured output (issue 20): JSON schema, JSON object, regex, choice and grammar constraints
offline, greedy and sampled, batched with unconstrained requests, with async scheduling on (the
mask waits for the previous step's token: sampling is deferred) and off.

Oracles: every constrained output parses / validates (jsonschema, re.fullmatch, membership);
constrained greedy decoding equals HF's logits masked by xgrammar's own matcher and
`apply_token_bitmask_inplace`; unconstrained rows are token-for-token what they are alone."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from graphwise import LLM, GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from graphwise.engine.validation import InvalidRequest
from graphwise.runner.inputs import Uploader
from graphwise.runner.logits_processors import apply_grammar_bitmask
from tests.conftest import hf_reference

xgr = pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "size": {"enum": ["small", "large"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "size", "ok"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"
CHOICES = ["red", "green", "blue sky"]
GRAMMAR = 'root ::= "(" digit ("+" digit){0,3} ")"\ndigit ::= [0-9]'
GRAMMAR_RE = r"\([0-9](\+[0-9]){0,3}\)"


def _so(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


def _constrained(temperature: float, seed: int) -> list[tuple[str, SamplingParams]]:
    def p(so: StructuredOutputsParams, n: int = 96, **kw) -> SamplingParams:
        return SamplingParams(
            temperature=temperature, seed=seed, max_tokens=n, structured_outputs=so, **kw
        )

    return [
        ("json", p(_so(json=SCHEMA, disable_any_whitespace=True))),
        ("regex", p(_so(regex=REGEX), 40)),
        ("choice", p(_so(choice=CHOICES), 12)),
        ("grammar", p(_so(grammar=GRAMMAR), 24)),
        ("json_object", p(_so(json_object=True, disable_any_whitespace=True))),
        ("json_text", p(_so(json=json.dumps(SCHEMA), disable_any_whitespace=True))),
    ]


def _check(kind: str, text: str) -> None:
    if kind in ("json", "json_text"):
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES
    elif kind == "grammar":
        assert re.fullmatch(GRAMMAR_RE, text), text


@pytest.fixture(scope="module")
def sync_llm(tiny_chat_dir):
    return LLM(model=str(tiny_chat_dir), max_num_seqs=16, max_model_len=1024,
               async_scheduling=False)  # fmt: skip


def _llm(request, which: str) -> LLM:
    return request.getfixturevalue("tiny_chat_llm" if which == "async" else "sync_llm")


PROMPTS = ["Give me a record:", "Email:", "Pick a colour.", "Sum:", "JSON please", "Again:"]
FREE = [
    SamplingParams(temperature=0, max_tokens=20),
    SamplingParams(temperature=1.0, seed=11, max_tokens=20, top_k=50),
]


@pytest.mark.parametrize("which", ["async", "sync"])
@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (1.0, 1)])
def test_constrained_outputs_are_valid_and_neighbours_unchanged(request, which, temperature, seed):
    llm = _llm(request, which)
    cases = _constrained(temperature, seed)
    free_prompts = ["Tell me a story", "Once upon"]
    alone = llm.generate(free_prompts, FREE, use_tqdm=False)
    prompts = [*PROMPTS, *free_prompts]
    params = [p for _, p in cases] + FREE
    outs = llm.generate(prompts, params, use_tqdm=False)
    for (kind, _), out in zip(cases, outs, strict=False):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (kind, c.text)
        _check(kind, c.text)
    for got, ref in zip(outs[len(cases) :], alone, strict=True):
        assert got.outputs[0].token_ids == ref.outputs[0].token_ids


@pytest.mark.slow
def test_async_and_sync_agree_and_async_defers_sampling(tiny_chat_llm, sync_llm):
    """Same tokens with and without async scheduling; with it, decode steps of constrained
    rows sample only once the previous token is in the matcher (sample_deferred)."""
    executor = tiny_chat_llm.llm_engine.executor
    calls = []
    original = executor.sample_deferred

    def spy(grammar):
        calls.append(len(grammar.rows))
        return original(grammar)

    executor.sample_deferred = spy
    try:
        params = [p for _, p in _constrained(1.0, 5)]
        a = tiny_chat_llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        del executor.sample_deferred
    b = sync_llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert calls and max(calls) > 1  # several constrained rows masked in one deferred sample


@pytest.mark.slow
def test_greedy_json_equals_hf_masked_by_xgrammar(tiny_chat_dir, sync_llm):
    """Reference written here: HF's logits, xgrammar's own matcher and mask kernel."""
    hf = hf_reference(tiny_chat_dir)
    tok = sync_llm.get_tokenizer()
    engine = sync_llm.llm_engine
    vocab = engine.model_config.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(
        tok, vocab_size=vocab, stop_token_ids=sorted(engine.eos_token_ids)
    )
    compiled = xgr.GrammarCompiler(info).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False
    )
    for prompt in ("Give me a record:", "JSON please"):
        ids = tok(prompt)["input_ids"]
        matcher = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, vocab)
        tokens = list(ids)
        for _ in range(96):
            with torch.no_grad():
                logits = hf(torch.tensor([tokens])).logits[0, -1:].float()
            matcher.fill_next_token_bitmask(mask)
            xgr.apply_token_bitmask_inplace(logits, mask)
            t = int(logits.argmax())
            tokens.append(t)
            assert matcher.accept_token(t)
            if matcher.is_terminated():
                break
        ref = tokens[len(ids) :]
        out = sync_llm.generate(
            {"prompt_token_ids": ids},
            SamplingParams(temperature=0, max_tokens=96,
                           structured_outputs=_so(json=SCHEMA, disable_any_whitespace=True)),
            use_tqdm=False,
        )[0].outputs[0]  # fmt: skip
        assert out.token_ids == ref


def test_bitmask_application_matches_xgrammar_kernel():
    torch.manual_seed(0)
    vocab, n = 1000, 5
    words = (vocab + 31) // 32
    mask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32)
    mask[1] = 0
    mask[1, 3] = -(2**31)  # only token 127 (the sign bit)
    rows = [0, 2, 4]
    logits = torch.randn(n, vocab)
    ours = logits.clone()
    apply_grammar_bitmask(ours, rows, mask.numpy(), Uploader(torch.device("cpu")))
    ref = logits.clone()
    full = torch.full((n, words), -1, dtype=torch.int32)
    full[rows] = mask
    xgr.apply_token_bitmask_inplace(ref, full)
    assert torch.equal(ours, ref)
    assert torch.isfinite(ours[2]).sum() == 1 and torch.isfinite(ours[2, 127])
    assert torch.equal(ours[[1, 3]], logits[[1, 3]])  # unconstrained rows untouched


def test_grammar_end_finishes_even_with_ignore_eos(sync_llm):
    out = sync_llm.generate(
        "Pick:",
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, min_tokens=5,
                       structured_outputs=_so(choice=["yes", "no"])),
        use_tqdm=False,
    )[0].outputs[0]  # fmt: skip
    assert out.finish_reason == "stop"
    assert out.text in ("yes", "no")


def test_guided_decoding_alias_and_dict_form(sync_llm):
    a = SamplingParams(
        temperature=0,
        max_tokens=12,
        guided_decoding=GuidedDecodingParams(choice=CHOICES, backend="xgrammar"),
    )
    b = SamplingParams(temperature=0, max_tokens=12, structured_outputs={"choice": CHOICES})
    c = SamplingParams(temperature=0, max_tokens=12, structured_outputs=_so(choice=CHOICES))
    outs = sync_llm.generate(["Pick a colour."] * 3, [a, b, c], use_tqdm=False)
    texts = {o.outputs[0].text for o in outs}
    assert len(texts) == 1 and texts <= set(CHOICES)
    assert a.structured_outputs is not None and a.guided_decoding is None


def test_compiled_grammars_are_cached_by_key(sync_llm):
    engine = sync_llm.llm_engine
    schema = {"type": "object", "properties": {"k": {"enum": [1, 2, 3]}}, "required": ["k"]}
    before = engine.structured.num_compiled
    p = SamplingParams(temperature=1.0, seed=3, max_tokens=40,
                       structured_outputs=_so(json=schema, disable_any_whitespace=True))  # fmt: skip
    outs = sync_llm.generate(["a", "b", "c"], p, use_tqdm=False)
    for o in outs:
        assert json.loads(o.outputs[0].text)["k"] in (1, 2, 3)
    assert engine.structured.num_compiled == before + 1


@pytest.mark.parametrize(
    "so,words",
    [
        (dict(json={"type": "objectx"}), ["JSON schema", "objectx"]),
        (dict(json="{not json"), ["not valid JSON"]),
        (dict(regex="a(b"), ["regex", "parenthesis"]),
        (dict(grammar="root ::= foo"), ["grammar", "foo"]),
    ],
)
def test_invalid_constraints_are_refused_at_add_request(sync_llm, so, words):
    with pytest.raises(ValueError) as info:
        sync_llm.generate("x", SamplingParams(max_tokens=4, structured_outputs=so), use_tqdm=False)
    for w in words:
        assert w in str(info.value)
    assert not sync_llm.llm_engine.has_unfinished_requests()


def test_invalid_constraint_is_an_invalid_request_naming_the_field(sync_llm):
    engine = sync_llm.llm_engine
    with pytest.raises(InvalidRequest) as info:
        engine.add_request("x", SamplingParams(structured_outputs=_so(regex="(((")))
    assert info.value.param == "structured_outputs"


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(json={"type": "object"}, regex="a"), dict(choice=[]), dict(choice=["a", 3]),
     dict(structural_tag="{}"), dict(json=[1, 2])],
)  # fmt: skip
def test_structured_outputs_params_check_their_shape(kw):
    with pytest.raises(ValueError):
        StructuredOutputsParams(**kw)


def test_unconstrained_steps_carry_no_grammar(sync_llm):
    engine = sync_llm.llm_engine
    engine.add_request("hello", SamplingParams(max_tokens=2))
    step = engine.scheduler.schedule()
    assert step.grammar is None
    engine.scheduler.update_from_output(
        step, engine.executor.execute_model(step).result()
    )  # resolve it so nothing stays in flight
    for rid in engine.unfinished_request_ids():
        engine.abort_request(rid)


@pytest.mark.parametrize("which", ["async", "sync"])
def test_n_samples_each_follow_the_constraint(request, which):
    """n > 1: every sample has its own matcher over the one compiled grammar (the forks share
    the prompt's KV, not the matcher); each is valid and equals a lone request with seed + i."""
    llm = _llm(request, which)
    so = _so(json=SCHEMA, disable_any_whitespace=True)
    params = SamplingParams(temperature=1.0, seed=21, max_tokens=96, n=3, structured_outputs=so)
    (out,) = llm.generate(["Give me a record:"], params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for i, c in enumerate(out.outputs):
        assert c.finish_reason == "stop", c.text
        _check("json", c.text)
        lone = SamplingParams(temperature=1.0, seed=21 + i, max_tokens=96, structured_outputs=so)
        (ref,) = llm.generate(["Give me a record:"], lone, use_tqdm=False)
        assert c.token_ids == ref.outputs[0].token_ids
    assert len({c.text for c in out.outputs}) > 1  # the seeds differ


def test_a_token_the_grammar_refuses_fails_its_request_alone(tiny_chat_llm):
    """allowed_token_ids without EOS: once the regex is complete the grammar allows EOS alone,
    the filter bans it, and some other token is sampled. That request fails with the reason;
    its neighbour in the batch finishes as it would alone."""
    tok = tiny_chat_llm.get_tokenizer()
    digit = tok.encode("1", add_special_tokens=False)[0]
    stuck = SamplingParams(max_tokens=8, structured_outputs=_so(regex="1{2}"),
                           allowed_token_ids=[digit, digit + 1])  # fmt: skip
    free = FREE[0]
    (alone,) = tiny_chat_llm.generate(["Once upon"], free, use_tqdm=False)
    bad, good = tiny_chat_llm.generate(["Count:", "Once upon"], [stuck, free], use_tqdm=False)
    assert bad.outputs[0].finish_reason == "error"
    assert "does not fit the structured-output grammar" in (bad.error or "")
    assert good.outputs[0].token_ids == alone.outputs[0].token_ids
