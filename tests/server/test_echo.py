"""echo and prompt_logprobs over the OpenAI routes (issue 15), against the offline engine on the
same model: lm-eval-harness's loglikelihood request (token ids, echo, logprobs 1, max_tokens 1),
echo with max_tokens 0, streamed echo, vLLM's prompt_logprobs field, and chat's echo."""

from __future__ import annotations

import json

import httpx
import pytest

from graphwise.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The three primary colors are red, yellow and"


def _offline(default_llm, ids: list[int], k: int, **kw):
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=k, **kw)
    return default_llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]


def _stream(http: httpx.Client, body: dict) -> list[dict]:
    resp = http.post("/v1/completions", json={**body, "stream": True})
    assert resp.status_code == 200, resp.text
    return [
        c
        for line in resp.text.splitlines()
        if line.startswith("data: {")
        for c in json.loads(line[6:])["choices"]
    ]


def test_lm_eval_loglikelihood_request(http, model_name, default_llm, default_tokenizer):
    ids = default_tokenizer.encode(PROMPT)
    body = {"model": model_name, "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1,
            "temperature": 0}  # fmt: skip
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    lp = choice["logprobs"]
    ref = _offline(default_llm, ids, 1, logprobs=1)
    generated = ref.outputs[0].token_ids[0]
    assert len(lp["tokens"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        entry = ref.prompt_logprobs[i]
        want = entry[ids[i]].logprob
        assert lp["token_logprobs"][i] == pytest.approx(want, abs=1e-4)
        assert lp["tokens"][i] == entry[ids[i]].decoded_token
        # the top one and the prompt token (lm-eval's is_greedy compares these)
        top = lp["top_logprobs"][i]
        assert 1 <= len(top) <= 2 and lp["tokens"][i] in top
        best = max(entry.values(), key=lambda e: e.logprob)
        assert max(top.values()) == pytest.approx(best.logprob, abs=1e-4)
    last = ref.outputs[0].logprobs[0][generated]
    assert lp["token_logprobs"][-1] == pytest.approx(last.logprob, abs=1e-4)
    assert choice["text"] == default_tokenizer.decode(ids) + ref.outputs[0].text
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    # vLLM returns the prompt's logprobs in its own field as well
    plp = choice["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    assert plp[3][str(ids[3])]["logprob"] == pytest.approx(lp["token_logprobs"][3], abs=1e-6)


def test_echo_with_max_tokens_0_returns_the_prompt_alone(http, model_name, default_tokenizer):
    body = {"model": model_name, "prompt": PROMPT, "echo": True, "max_tokens": 0, "logprobs": 0}
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    choice = data["choices"][0]
    n = len(default_tokenizer.encode(PROMPT))
    assert choice["text"] == PROMPT
    assert len(choice["logprobs"]["tokens"]) == n
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert all(v is not None and v <= 0 for v in choice["logprobs"]["token_logprobs"][1:])
    assert data["usage"] == {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}
    streamed = _stream(http, body)
    assert "".join(c["text"] for c in streamed) == PROMPT
    # without echo, 0 is refused
    bad = http.post("/v1/completions", json={**body, "echo": False})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_echo_text_and_stream(http, model_name):
    body = {"model": model_name, "prompt": [PROMPT, "Hello"], "echo": True, "max_tokens": 5,
            "temperature": 0, "logprobs": 2}  # fmt: skip
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    choices = resp.json()["choices"]
    plain = http.post("/v1/completions", json={**body, "echo": False, "logprobs": None}).json()
    for c, p, prompt in zip(choices, plain["choices"], body["prompt"], strict=True):
        assert c["text"] == prompt + p["text"]
        assert "".join(c["logprobs"]["tokens"][1:]) in c["text"]
    streamed = _stream(http, body)
    for i, c in enumerate(choices):
        mine = [s for s in streamed if s["index"] == i]
        assert "".join(s["text"] for s in mine) == c["text"]
        tokens = [t for s in mine if s["logprobs"] for t in s["logprobs"]["tokens"]]
        values = [v for s in mine if s["logprobs"] for v in s["logprobs"]["token_logprobs"]]
        assert tokens == c["logprobs"]["tokens"]
        assert values[0] is None
        assert values[1:] == pytest.approx(c["logprobs"]["token_logprobs"][1:], abs=1e-6)


def test_prompt_logprobs_field(http, model_name, default_llm, default_tokenizer):
    ids = default_tokenizer.encode(PROMPT)
    ref = _offline(default_llm, ids, 3)
    for path, body in (
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}),
    ):
        body = {"model": model_name, "max_tokens": 2, "prompt_logprobs": 3, **body}
        resp = http.post(path, json=body)
        assert resp.status_code == 200, resp.text
        data = resp.json()
        plp = data["prompt_logprobs"] if "chat" in path else data["choices"][0]["prompt_logprobs"]
        assert plp[0] is None and len(plp) == data["usage"]["prompt_tokens"]
        if "chat" in path:
            continue  # the chat template wraps the prompt: only the shape is compared
        assert len(plp) == len(ids)
        for i in range(1, len(ids)):
            entry = plp[i]
            assert 3 <= len(entry) <= 4 and str(ids[i]) in entry
            for tid, value in entry.items():
                want = ref.prompt_logprobs[i][int(tid)]
                assert value["logprob"] == pytest.approx(want.logprob, abs=1e-4)
                assert value["rank"] == want.rank
                assert value["decoded_token"] == want.decoded_token
        # not streamed above 0 (vLLM's rule); 0 is accepted
        err = http.post(path, json={**body, "stream": True})
        assert err.status_code == 400 and err.json()["error"]["param"] == "prompt_logprobs"
        assert http.post(path, json={**body, "stream": True, "prompt_logprobs": 0}).is_success
    # over max_logprobs (20): named
    big = http.post("/v1/completions", json={"prompt": PROMPT, "prompt_logprobs": 21})
    assert big.status_code == 400 and big.json()["error"]["param"] == "prompt_logprobs"


def test_chat_echo(http, model_name):
    base = {"model": model_name, "max_tokens": 4, "temperature": 0, "echo": True}
    cont = [{"role": "user", "content": "Say hello"},
            {"role": "assistant", "content": "Hello, my name"}]  # fmt: skip
    body = {**base, "messages": cont, "continue_final_message": True}
    echoed = http.post("/v1/chat/completions", json=body).json()
    plain = http.post("/v1/chat/completions", json={**body, "echo": False}).json()
    content = echoed["choices"][0]["message"]["content"]
    assert content == "Hello, my name" + plain["choices"][0]["message"]["content"]
    resp = http.post("/v1/chat/completions", json={**body, "stream": True})
    deltas = [
        c["delta"].get("content", "")
        for line in resp.text.splitlines()
        if line.startswith("data: {")
        for c in json.loads(line[6:])["choices"]
    ]
    assert "".join(deltas) == content
    # the last message is the user's: nothing to echo
    user = {**base, "messages": cont[:1]}
    a = http.post("/v1/chat/completions", json=user).json()
    b = http.post("/v1/chat/completions", json={**user, "echo": False}).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_echo_with_n_samples(http, model_name):
    """n > 1 with echo and logprobs: every choice of every prompt leads with its prompt's text
    and tokens (the prompt scored once, by sample 0), streamed the same."""
    body = {"model": model_name, "prompt": [PROMPT, "Hello"], "echo": True, "max_tokens": 4,
            "temperature": 1.0, "seed": 3, "n": 2, "logprobs": 1}  # fmt: skip
    resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c in choices:
        prompt = body["prompt"][c["index"] // 2]
        assert c["text"].startswith(prompt)
        assert c["logprobs"]["token_logprobs"][0] is None
        assert c["prompt_logprobs"][0] is None
    # both samples of a prompt share its prompt part of the logprobs
    for a, b in ((0, 1), (2, 3)):
        la, lb = choices[a]["logprobs"], choices[b]["logprobs"]
        m = len(choices[a]["prompt_logprobs"])
        assert la["tokens"][:m] == lb["tokens"][:m]
        assert la["token_logprobs"][1:m] == pytest.approx(lb["token_logprobs"][1:m], abs=1e-6)
    streamed = _stream(http, body)
    for c in choices:
        mine = [s for s in streamed if s["index"] == c["index"]]
        assert "".join(s["text"] for s in mine) == c["text"]
