"""Malformed and hostile requests get 4xx with OpenAI's error JSON, never a 5xx."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

# Starts processes (servers, ranks): run by .ci/run, left out of the inner loop (-m "not slow").
pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


# (name, path, raw body or dict, expected status, expected param or None)
CASES: list[tuple[str, str, Any, int, str | None]] = [
    ("bad json", COMPL, b'{"prompt": "x",', 400, None),
    ("not an object", COMPL, b"[1, 2, 3]", 400, None),
    ("empty body", COMPL, b"", 400, None),
    ("invalid utf-8", COMPL, b'{"prompt": "\xff\xfe\xfd"}', 400, None),
    ("lone surrogate", COMPL, b'{"prompt": "\\ud800"}', 400, None),
    ("missing prompt", COMPL, {"max_tokens": 4}, 400, "prompt"),
    ("prompt wrong type", COMPL, {"prompt": 5}, 400, "prompt"),
    ("prompt bool ids", COMPL, {"prompt": [True, False]}, 400, "prompt.0"),
    ("empty prompt", COMPL, {"prompt": ""}, 400, "prompt"),
    ("empty id list", COMPL, {"prompt": []}, 400, "prompt"),
    ("token id out of vocab", COMPL, {"prompt": [1, 10**9]}, 400, "prompt"),
    ("negative token id", COMPL, {"prompt": [1, -5]}, 400, "prompt"),
    ("stop id out of vocab", COMPL, {"prompt": "hi", "stop_token_ids": [10**9], "min_tokens": 2}, 400, "stop_token_ids"),
    ("negative stop id", COMPL, {"prompt": "hi", "stop_token_ids": [-1], "min_tokens": 2}, 400, "stop_token_ids"),
    ("chat stop id out of vocab", CHAT, {"messages": USER, "stop_token_ids": [49152]}, 400, "stop_token_ids"),
    ("one bad prompt of several", COMPL, {"prompt": [[1, 2], [1, 10**9]]}, 400, "prompt.1"),
    ("one long prompt of several", COMPL, {"prompt": ["hi", "hello " * 3000]}, 400, "prompt.1"),
    ("too many prompts", COMPL, {"prompt": ["a"] * 1025}, 400, "prompt"),
    ("penalty out of range", COMPL, {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("chat tools without a parser", CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice"),
    ("chat template kwarg clash", CHAT, {"messages": USER, "chat_template_kwargs": {"tokenize": True}}, 400, "chat_template_kwargs.tokenize"),
    ("oversized prompt", COMPL, {"prompt": "hello " * 3000, "max_tokens": 4}, 400, "prompt"),
    ("prompt + max_tokens too long", COMPL, {"prompt": [1] * 1000, "max_tokens": 100}, 400, "max_tokens"),
    ("huge max_tokens", COMPL, {"prompt": "hi", "max_tokens": 10**30}, 400, "max_tokens"),
    ("zero max_tokens", COMPL, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("negative max_tokens", COMPL, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("string max_tokens", COMPL, {"prompt": "hi", "max_tokens": "16"}, 400, "max_tokens"),
    ("float max_tokens", COMPL, {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("negative temperature", COMPL, {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("string temperature", COMPL, {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("top_p zero", COMPL, {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("top_p above one", COMPL, {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("top_k zero", COMPL, {"prompt": "hi", "top_k": 0}, 400, "top_k"),
    ("negative min_tokens", COMPL, {"prompt": "hi", "min_tokens": -3}, 400, "min_tokens"),
    ("min over max", COMPL, {"prompt": "hi", "min_tokens": 9, "max_tokens": 3}, 400, "min_tokens"),
    ("seed too big", COMPL, {"prompt": "hi", "seed": 2**80}, 400, "seed"),
    ("stop wrong type", COMPL, {"prompt": "hi", "stop": [1, 2]}, 400, "stop.0"),
    ("too many stops", COMPL, {"prompt": "hi", "stop": ["x"] * 65}, 400, "stop"),
    ("stream wrong type", COMPL, {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("n=0", COMPL, {"prompt": "hi", "n": 0}, 400, "n"),
    ("n over 128", COMPL, {"prompt": "hi", "n": 129}, 400, "n"),
    ("n string", COMPL, {"prompt": "hi", "n": "2"}, 400, "n"),
    ("best_of above n", COMPL, {"prompt": "hi", "n": 2, "best_of": 3}, 400, "best_of"),
    ("prompts x n over the cap", COMPL, {"prompt": ["a"] * 9, "n": 128}, 400, "n"),
    ("logprobs over max_logprobs", COMPL, {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("top_logprobs without logprobs", CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    ("unknown model", COMPL, {"prompt": "hi", "model": "gpt-4o"}, 404, "model"),
    ("missing messages", CHAT, {"max_tokens": 4}, 400, "messages"),
    ("empty messages", CHAT, {"messages": []}, 400, "messages"),
    ("messages not a list", CHAT, {"messages": "hi"}, 400, "messages"),
    ("bad role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("missing role", CHAT, {"messages": [{"content": "x"}]}, 400, "messages.0.role"),
    ("content wrong type", CHAT, {"messages": [{"role": "user", "content": 7}]}, 400, "messages.0.content"),
    ("image content", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages.0.content.0.type"),
    ("chat n=0", CHAT, {"messages": USER, "n": 0}, 400, "n"),
    ("chat best_of above n", CHAT, {"messages": USER, "best_of": 2}, 400, "best_of"),
    ("chat unknown model", CHAT, {"messages": USER, "model": "nope"}, 404, "model"),
    ("chat huge max_completion_tokens", CHAT, {"messages": USER, "max_completion_tokens": 10**6}, 400, "max_completion_tokens"),
    ("chat oversized", CHAT, {"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "messages"),
]  # fmt: skip


def _check_error(resp: httpx.Response, status: int, param: str | None) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] == param, err


@pytest.mark.parametrize("name,path,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request(
    http: httpx.Client, name: str, path: str, body: Any, status: int, param: str | None
) -> None:
    raw = body if isinstance(body, bytes) else _json(body)
    resp = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    _check_error(resp, status, param)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}, {"Authorization": ""}],
    ids=["missing", "wrong", "basic", "empty"],
)
def test_api_key(server, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=server.url, trust_env=False, timeout=30) as c:
        for method, path in (("POST", CHAT), ("POST", COMPL), ("GET", "/v1/models")):
            resp = c.request(method, path, headers=headers, content=_json({"messages": USER}))
            _check_error(resp, 401, None)
            assert resp.json()["error"]["code"] == "invalid_api_key"


def test_unknown_route_and_method(http: httpx.Client) -> None:
    _check_error(http.get("/v1/nothing"), 404, None)
    _check_error(http.get(COMPL), 405, None)


def test_still_serves_after_abuse(client, model_name: str, http: httpx.Client) -> None:
    for _name, path, body, _, _ in CASES[:10]:  # a burst of garbage, then a normal request
        http.post(path, content=body if isinstance(body, bytes) else _json(body))
    resp = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=16,
    )
    assert "Paris" in resp.choices[0].message.content
    assert http.get("/health").status_code == 200
