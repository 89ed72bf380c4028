"""Failure paths, in process, against a scripted fake engine (no model, runs in a second).

What a real model cannot be made to do on demand: fail a step, kill the engine thread, keep
requests waiting long enough to fill the queue.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fake_engine import BODY, FakeEngine, Fatal, run_app

from graphwise.server.async_engine import AsyncEngine


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_fake_engine_serves() -> None:
    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        resp = await client.post("/v1/completions", json=BODY)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"] == {
            "prompt_tokens": 3,
            "completion_tokens": 3,
            "total_tokens": 6,
        }

    run_app(FakeEngine(), test)


def test_step_error_fails_its_requests_and_the_server_recovers() -> None:
    fake = FakeEngine()

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        fake.fail_next = RuntimeError("kernel exploded")
        err = _error(await client.post("/v1/completions", json=BODY), 500)
        assert err["type"] == "server_error" and "kernel exploded" in err["message"]
        assert not fake.requests  # aborted in the engine
        fake.fail_next = RuntimeError("again")
        streamed = await client.post("/v1/completions", json={**BODY, "stream": True})
        assert streamed.status_code == 200
        events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
        assert (await client.post("/v1/completions", json=BODY)).status_code == 200
        assert (await client.get("/health")).status_code == 200

    run_app(fake, test)


def test_dead_engine_thread_is_reported(metric) -> None:
    fake = FakeEngine()

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        fake.fail_next = Fatal("gone")
        _error(await client.post("/v1/completions", json=BODY), 503)
        health = await client.get("/health")
        assert health.status_code == 503 and "gone" in health.json()["error"]
        err = _error(await client.post("/v1/completions", json=BODY), 503)
        assert err["code"] == "engine_dead"
        assert metric((await client.get("/metrics")).text, "graphwise:engine_alive") == 0

    run_app(fake, test)


def test_engine_whose_workers_died_is_reported_dead() -> None:
    """A step failure that leaves the engine unable to run (its tensor-parallel workers are
    gone): /health turns 503 and new requests get 503 engine_dead, not a 500 each."""
    fake = FakeEngine()

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        fake.fail_next = RuntimeError("the workers are gone")
        fake.alive = False
        assert (await client.post("/v1/completions", json=BODY)).status_code in (500, 503)
        assert (await client.get("/health")).status_code == 503
        err = _error(await client.post("/v1/completions", json=BODY), 503)
        assert err["code"] == "engine_dead"

    run_app(fake, test)


def test_request_failed_alone_gets_a_500_and_is_counted(metric) -> None:
    """An output the engine marks failed (finish reason "error") is that request's 500 and a
    request_success{finished_reason="error"} count; the next request is served."""
    fake = FakeEngine()

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        fake.fail_request = "bad request id"
        err = _error(await client.post("/v1/completions", json=BODY), 500)
        assert err["code"] == "engine_error" and "bad request id" in err["message"]
        fake.fail_request = None
        assert (await client.post("/v1/completions", json=BODY)).status_code == 200
        text = (await client.get("/metrics")).text
        assert metric(text, "graphwise:request_success_total", 'finished_reason="error"') == 1

    run_app(fake, test)


def test_full_queue_gets_503_with_retry_after() -> None:
    fake = FakeEngine()
    fake.gate.clear()  # the first step blocks: requests stay queued

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        first = asyncio.ensure_future(client.post("/v1/completions", json=BODY))
        while engine.num_waiting() < 1:
            await asyncio.sleep(0.01)
        resp = await client.post("/v1/completions", json=BODY)
        err = _error(resp, 503)
        assert err["code"] == "queue_full" and resp.headers["retry-after"] == "1"
        fake.gate.set()
        assert (await first).status_code == 200

    run_app(fake, test, max_waiting=1)


def test_draining_server_refuses_new_requests() -> None:
    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        app.state.graphwise.draining = True
        err = _error(await client.post("/v1/completions", json=BODY), 503)
        assert err["code"] == "shutting_down"
        assert (await client.get("/health")).status_code == 503

    run_app(FakeEngine(), test)


def test_text_prompt_without_tokenizer_is_a_400() -> None:
    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        err = _error(await client.post("/v1/completions", json={"prompt": "hi"}), 400)
        assert err["param"] == "prompt"
        chat = {"messages": [{"role": "user", "content": "x"}]}
        err = _error(await client.post("/v1/chat/completions", json=chat), 400)
        assert err["param"] == "messages"

    run_app(FakeEngine(), test)


def test_oversized_body_is_a_413() -> None:
    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        big = {"prompt": [1] * 200, "max_tokens": 3}
        err = _error(await client.post("/v1/completions", json=big), 413)
        assert err["code"] == "body_too_large"

        async def chunked():  # no Content-Length: the limit applies while reading
            yield b'{"prompt": ['
            for _ in range(100):
                yield b"1, "
            yield b"1]}"

        resp = await client.post("/v1/completions", content=chunked())
        _error(resp, 413)
        assert (await client.post("/v1/completions", json=BODY)).status_code == 200

    run_app(FakeEngine(), test, max_body_bytes=200)
