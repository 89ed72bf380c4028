"""Huge prompts against the app in process, with the embedded model's real tokenizer and a
fake engine: refused fast, without tokenizing, without stalling anyone else or keeping memory.

Before: a 20 MB text was tokenized on the only tokenizer thread (~10 s) and then refused; a
small request sent meanwhile waited behind it, and the process kept >1 GB more RSS.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from fake_engine import FakeEngine

from graphwise.server.app import ServerSettings, build_app
from graphwise.server.async_engine import AsyncEngine

MB = 1024 * 1024
SMALL = {"prompt": "Hello there", "max_tokens": 2}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_with_tokenizer(
    tokenizer: Any, max_model_len: int, test: Callable[[httpx.AsyncClient, Any], Awaitable[None]]
) -> None:
    fake = FakeEngine()
    fake.tokenizer = tokenizer  # type: ignore[misc]
    fake.max_model_len = max_model_len  # type: ignore[misc]
    fake.model_config.vocab_size = len(tokenizer)
    app = build_app(AsyncEngine(fake, 16), ServerSettings(served_model_names=["fake"]))  # type: ignore[arg-type]

    async def main() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://test", timeout=60
            ) as client:
                await client.post("/v1/completions", json=SMALL)  # warm: first request costs
                await asyncio.wait_for(test(client, app.state.graphwise), 60)

    asyncio.run(main())


async def _big_and_small(
    client: httpx.AsyncClient, path: str, body: bytes
) -> tuple[httpx.Response, float, float]:
    """Sends `body`, and a small request right behind it; returns the big one's response and
    how long each took."""

    async def timed(coro: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
        start = time.perf_counter()
        resp = await coro
        return resp, time.perf_counter() - start

    headers = {"content-type": "application/json"}
    big = asyncio.ensure_future(timed(client.post(path, content=body, headers=headers)))
    await asyncio.sleep(0)  # the big one goes first
    (small, small_s), (resp, big_s) = await asyncio.gather(
        timed(client.post("/v1/completions", json=SMALL)), big
    )
    assert small.status_code == 200, small.text
    return resp, big_s, small_s


def _text_body(size: int) -> bytes:
    return json.dumps({"prompt": "hello world " * (size // 12), "max_tokens": 4}).encode()


def _chat_body(size: int) -> bytes:
    message = {"role": "user", "content": "hello world " * (size // 12)}
    return json.dumps({"messages": [message], "max_tokens": 4}).encode()


@pytest.mark.parametrize(
    "path, make", [("/v1/completions", _text_body), ("/v1/chat/completions", _chat_body)]
)
def test_20mb_prompt_over_the_body_limit(default_tokenizer: Any, path: str, make: Any) -> None:
    async def test(client: httpx.AsyncClient, state: Any) -> None:
        body = make(20 * MB)
        assert len(body) > state.max_body_bytes  # 1024 tokens: ~560 KB is all one can need
        resp, big_s, small_s = await _big_and_small(client, path, body)
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"
        assert "1024-token context" in resp.json()["error"]["message"]
        assert big_s < 0.5 and small_s < 1.0

    run_with_tokenizer(default_tokenizer, 1024, test)


@pytest.mark.parametrize(
    "path, make", [("/v1/completions", _text_body), ("/v1/chat/completions", _chat_body)]
)
def test_20mb_prompt_within_the_body_limit_is_refused_untokenized(
    default_tokenizer: Any, path: str, make: Any
) -> None:
    # A 64k context: the body limit (~32 MB) lets 20 MB through, the text bound does not.
    async def test(client: httpx.AsyncClient, state: Any) -> None:
        body = make(20 * MB)
        assert len(body) <= state.max_body_bytes
        before = _rss_mb()
        resp, big_s, small_s = await _big_and_small(client, path, body)
        err = resp.json()["error"]
        assert resp.status_code == 400 and err["code"] == "context_length_exceeded", err
        assert "at least" in err["message"]  # the bound's message, not a tokenizer count
        assert big_s < 1.0 and small_s < 1.0
        assert _rss_mb() - before < 256  # tokenizing it grew RSS by >1 GB, for good

    run_with_tokenizer(default_tokenizer, 65536, test)


def test_longest_admissible_text_is_tokenized_without_stalling(default_tokenizer: Any) -> None:
    # Just under the bound it must be tokenized (it might fit); a small request meanwhile
    # takes the other lane. A fast tokenizer releases the GIL, so the loop runs on.
    async def test(client: httpx.AsyncClient, state: Any) -> None:
        n = (state.max_model_len - 1) * state.limits.bound.bytes_per_token
        body = json.dumps({"prompt": ("hello world " * (n // 12 + 1))[:n]}).encode()
        resp, big_s, small_s = await _big_and_small(client, "/v1/completions", body)
        err = resp.json()["error"]
        assert resp.status_code == 400 and err["code"] == "context_length_exceeded"
        assert "at least" not in err["message"]  # counted by the tokenizer this time
        assert small_s < 1.0

    run_with_tokenizer(default_tokenizer, 8192, test)


def test_pathological_json_is_refused_before_parsing(default_tokenizer: Any) -> None:
    # 4 MB of one-element lists took pydantic 2 s and 400 MB on the event loop.
    async def test(client: httpx.AsyncClient, state: Any) -> None:
        n = state.max_body_bytes // 5
        body = b'{"prompt": [' + b"[1]," * n + b"[1]]}"
        assert len(body) <= state.max_body_bytes
        resp, big_s, small_s = await _big_and_small(client, "/v1/completions", body)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "body_too_complex"
        assert big_s < 0.5 and small_s < 1.0

    run_with_tokenizer(default_tokenizer, 8192, test)
