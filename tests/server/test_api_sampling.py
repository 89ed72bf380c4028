"""Logprobs, penalties and filters over the OpenAI routes (issue 15), against the offline
engine on the same model: the same numbers in OpenAI's response shapes, streamed too."""

from __future__ import annotations

import json

import httpx
import pytest

from graphwise.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The three primary colors are"


def test_completion_logprobs_equal_the_engines(http: httpx.Client, model_name, default_llm):
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
            "logprobs": 3}  # fmt: skip
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    lp = choice["logprobs"]
    ref = default_llm.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=8, logprobs=3), use_tqdm=False
    )[0].outputs[0]
    assert len(lp["tokens"]) == len(ref.token_ids) == resp.json()["usage"]["completion_tokens"]
    for i, token in enumerate(ref.token_ids):
        assert lp["token_logprobs"][i] == pytest.approx(ref.logprobs[i][token].logprob, abs=1e-4)
        assert lp["tokens"][i] == ref.logprobs[i][token].decoded_token
        assert 3 <= len(lp["top_logprobs"][i]) <= 4  # the top 3, and the sampled token
        assert max(lp["top_logprobs"][i].values()) == pytest.approx(lp["token_logprobs"][i])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert "".join(lp["tokens"]) == choice["text"]
    # as token ids (vLLM's return_tokens_as_token_ids)
    ids = http.post("/v1/completions", json={**body, "return_tokens_as_token_ids": True}).json()
    assert ids["choices"][0]["logprobs"]["tokens"] == [f"token_id:{t}" for t in ref.token_ids]
    # streamed: the same tokens and numbers, chunk by chunk
    streamed = http.post("/v1/completions", json={**body, "stream": True})
    tokens, values = [], []
    for line in streamed.text.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                if c.get("logprobs"):
                    tokens += c["logprobs"]["tokens"]
                    values += c["logprobs"]["token_logprobs"]
    assert tokens == lp["tokens"] and values == pytest.approx(lp["token_logprobs"], abs=1e-6)


def test_chat_logprobs_shape(client, model_name) -> None:
    resp = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Say hi."}],
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(c.token for c in content) == resp.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.token == c.top_logprobs[0].token  # greedy: the most likely
        assert bytes(c.bytes).decode() == c.token
    plain = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Say hi."}], max_tokens=2
    )
    assert plain.choices[0].logprobs is None


def test_penalties_and_filters_equal_the_engines(http: httpx.Client, model_name, default_llm):
    fields = {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.3,
              "min_p": 0.05, "allowed_token_ids": list(range(200, 2000)),
              "bad_words": ["the"]}  # fmt: skip
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, **fields}
    got = http.post("/v1/completions", json=body)
    assert got.status_code == 200, got.text
    want = default_llm.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=12, **fields), use_tqdm=False
    )[0].outputs[0]
    assert got.json()["choices"][0]["text"] == want.text
    forced = http.post(
        "/v1/completions",
        json={"model": model_name, "prompt": PROMPT, "max_tokens": 4, "temperature": 0.8,
              "seed": 1, "logit_bias": {"1234": 100}, "logprobs": 0},
    ).json()  # fmt: skip
    assert (
        forced["choices"][0]["logprobs"]["tokens"]
        == [default_llm.get_tokenizer().decode([1234])] * 4
    )
    bad = http.post("/v1/completions", json={**body, "logit_bias": {"x": 1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"
    far = http.post("/v1/completions", json={**body, "logit_bias": {"99999999": 1}})
    assert far.status_code == 400 and far.json()["error"]["param"] == "logit_bias"
