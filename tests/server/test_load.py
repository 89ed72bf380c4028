"""Many concurrent streams, some of whose clients walk away: the rest finish, nothing leaks."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

# Starts processes (servers, ranks): run by .ci/run, left out of the inner loop (-m "not slow").
pytestmark = pytest.mark.slow

N_REQUESTS = 64
N_DISCONNECT = N_REQUESTS // 4
MAX_TOKENS = 24
LOAD_TIMEOUT_S = 180.0


def _wait_idle(http: httpx.Client, metric, timeout: float = 15.0) -> str:
    """Poll /metrics until no request runs or waits and no KV block is held."""
    deadline = time.monotonic() + timeout
    while True:
        text = http.get("/metrics").text
        busy = [
            metric(text, "graphwise:num_requests_running"),
            metric(text, "graphwise:num_requests_waiting"),
            metric(text, "graphwise:kv_cache_used_blocks"),
        ]
        if busy == [0, 0, 0] or time.monotonic() > deadline:
            assert busy == [0, 0, 0], f"running, waiting, KV blocks still {busy}"
            return text
        time.sleep(0.1)


async def _one(client: openai.AsyncOpenAI, model: str, i: int, disconnect: bool) -> dict:
    stream = await client.completions.create(
        model=model,
        prompt=f"Request {i}: list some facts about the number {i}.",
        max_tokens=MAX_TOKENS,
        temperature=0.8,
        seed=i,
        stream=True,
        extra_body={"ignore_eos": disconnect},  # those that leave must still be running
    )
    chunks, finish = 0, None
    async for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if disconnect and chunks >= 3:
            await stream.close()  # drops the connection mid-stream
            break
    return {"i": i, "disconnect": disconnect, "chunks": chunks, "finish": finish}


async def _load(base_url: str, api_key: str, model: str) -> list[dict]:
    limits = httpx.Limits(max_connections=N_REQUESTS + 8, max_keepalive_connections=N_REQUESTS)
    http_client = httpx.AsyncClient(trust_env=False, timeout=120, limits=limits)
    async with openai.AsyncOpenAI(
        base_url=base_url, api_key=api_key, max_retries=0, http_client=http_client
    ) as client:
        jobs = [_one(client, model, i, i % 4 == 0) for i in range(N_REQUESTS)]
        return await asyncio.wait_for(asyncio.gather(*jobs), LOAD_TIMEOUT_S)


def test_concurrent_streams_with_disconnects(server, http: httpx.Client, model_name: str, metric):
    before = http.get("/metrics").text
    aborts_before = metric(before, "graphwise:request_success_total", 'finished_reason="abort"')
    start = time.monotonic()
    results = asyncio.run(_load(server.base_url, server.api_key, model_name))
    elapsed = time.monotonic() - start
    stayed = [r for r in results if not r["disconnect"]]
    left = [r for r in results if r["disconnect"]]
    assert len(left) == N_DISCONNECT
    assert all(r["finish"] in ("stop", "length") for r in stayed), stayed
    assert all(r["chunks"] == 3 and r["finish"] is None for r in left), left
    assert http.get("/health").status_code == 200

    text = _wait_idle(http, metric)
    aborts = metric(text, "graphwise:request_success_total", 'finished_reason="abort"')
    assert aborts - aborts_before == N_DISCONNECT
    assert metric(text, "graphwise:kv_cache_usage_perc") == 0
    print(f"{N_REQUESTS} streams ({N_DISCONNECT} disconnected) in {elapsed:.1f} s")


def test_non_streaming_client_that_leaves_is_aborted(
    server, http: httpx.Client, model_name, metric
):
    abort = 'finished_reason="abort"'
    before = metric(http.get("/metrics").text, "graphwise:request_success_total", abort)
    body = {"model": model_name, "prompt": "Tell me a long story.", "max_tokens": 900}
    body["ignore_eos"] = True  # ~900 steps: far longer than the client waits
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.Client(trust_env=False, timeout=1.5) as c:
        try:
            c.post(server.base_url + "/completions", json=body, headers=headers)
            raise AssertionError("the request should not have finished in 1.5 s")
        except httpx.ReadTimeout:
            pass  # the client gives up and closes its connection
    text = _wait_idle(http, metric)
    assert metric(text, "graphwise:request_success_total", abort) - before == 1
