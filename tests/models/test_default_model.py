"""The embedded default (SmolLM2-135M-Instruct GGUF) against HF transformers on the same file:
the smoke tests on real weights (behaviour tests use the tiny models)."""

from __future__ import annotations

import pytest
import torch

from graphwise import SamplingParams
from graphwise.models.default import default_model_path

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_default():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    return tok, model


def test_default_answers_paris(default_llm):
    out = default_llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    text = out[0].outputs[0].text
    assert "Paris" in text
    assert out[0].outputs[0].finish_reason == "stop"


def test_default_greedy_tokens_equal_hf(default_llm, hf_default):
    tok, model = hf_default
    prompts = ["What is the capital of France?", "Write a haiku about the sea."]
    params = SamplingParams(temperature=0, max_tokens=20)
    for prompt in prompts:
        ids = default_llm.apply_chat_template([{"role": "user", "content": prompt}])
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
        expected = ref[0, len(ids) :].tolist()
        got = default_llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        assert got.outputs[0].token_ids == expected
        assert got.outputs[0].text == tok.decode(expected, skip_special_tokens=True)


def test_batched_generation_matches_one_by_one(default_llm):
    prompts = ["The sun is", "Once upon a time", "Python is a programming language that"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batched = default_llm.generate(prompts, params, use_tqdm=False)
    single = [default_llm.generate(p, params, use_tqdm=False)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in batched] == [o.outputs[0].token_ids for o in single]
    assert [o.prompt for o in batched] == prompts


def test_default_prompt_logprobs_equal_hf(default_llm, hf_default):
    """Real weights: each prompt token's logprob, rank and the top 5 equal HF's log-softmax."""
    tok, model = hf_default
    ids = tok.encode("The three primary colors are red, yellow and blue. The sky is")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5)
    (out,) = default_llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for i, entry in enumerate(out.prompt_logprobs[1:]):
        token = ids[i + 1]
        assert entry[token].logprob == pytest.approx(ref[i, token].item(), abs=1e-3)
        assert entry[token].rank == int((ref[i] > ref[i, token]).sum()) + 1
        top = ref[i].topk(5)
        assert list(entry)[:5] == top.indices.tolist()
        assert entry[token].decoded_token == tok.decode([token])


def test_default_structured_outputs_validate(default_llm):
    """Real weights under constraints (issue 20): a JSON schema, a regex and a choice, greedy
    and seeded sampling, prefix caching on (the same prompt twice) and async scheduling."""
    import json
    import re

    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("xgrammar")
    from graphwise import StructuredOutputsParams

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    question = [{"role": "user", "content": "Name a city and its country, as JSON."}]
    for temperature, seed in ((0.0, None), (1.0, 7)):
        cases = [
            StructuredOutputsParams(json=schema, disable_any_whitespace=True),
            StructuredOutputsParams(regex=r"[A-Z][a-z]{2,12}"),
            StructuredOutputsParams(choice=["Paris", "Berlin", "Madrid"]),
        ]
        params = [
            SamplingParams(temperature=temperature, seed=seed, max_tokens=64, structured_outputs=so)
            for so in cases
        ]
        outs = default_llm.chat([question] * 3, params, use_tqdm=False)
        again = default_llm.chat([question] * 3, params, use_tqdm=False)  # prefix-cache hits
        for out, rerun in zip(outs, again, strict=True):
            assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
            if seed is not None or temperature == 0:
                assert out.outputs[0].text == rerun.outputs[0].text
        jsonschema.validate(json.loads(outs[0].outputs[0].text), schema)
        assert re.fullmatch(r"[A-Z][a-z]{2,12}", outs[1].outputs[0].text)
        assert outs[2].outputs[0].text in ("Paris", "Berlin", "Madrid")
