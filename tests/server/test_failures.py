"""Failure paths, in process, against a scripted fake engine (no model, runs in a second).

What a real model cannot be made to do on demand: fail a step, kill the engine thread, keep
requests waiting long enough to fill the queue.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import httpx

from graphwise.engine.client import EngineStats
from graphwise.outputs import CompletionOutput, RequestOutput
from graphwise.server.app import ServerSettings, build_app
from graphwise.server.async_engine import AsyncEngine


class Fatal(BaseException):
    """Not an Exception: what kills the engine thread rather than one step."""


class FakeEngine:
    """Duck-types the parts of LLMEngine the server uses; emits token 7 once per step."""

    tokenizer = None
    model_name = "fake"
    max_model_len = 64

    def __init__(self) -> None:
        self.model_config = SimpleNamespace(vocab_size=100)
        self.steps = 0
        self.requests: dict[str, tuple[list[int], Any, list[int]]] = {}
        self.fail_next: BaseException | None = None
        self.gate = threading.Event()  # steps wait for it: lets tests keep requests queued
        self.gate.set()

    def add_request(self, prompt: Any, params: Any, prompt_token_ids: list[int], request_id: str):
        self.requests[request_id] = (prompt_token_ids, params, [])

    def abort_request(self, request_id: str) -> bool:
        return self.requests.pop(request_id, None) is not None

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.gate.wait(10)
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        self.steps += 1
        outs = []
        for rid, (prompt, params, tokens) in list(self.requests.items()):
            tokens.append(7)
            done = len(tokens) >= params.max_tokens
            if done:
                del self.requests[rid]
            reason = "length" if done else None
            completion = CompletionOutput(0, "x" * len(tokens), list(tokens), reason)
            out = RequestOutput(rid, None, prompt, [completion], done)
            out.delta_text, out.delta_token_ids = "x", [7]
            outs.append(out)
        return outs

    def get_stats(self) -> EngineStats:
        # Everything counts as waiting, so the queue limit is easy to reach.
        return EngineStats(
            num_waiting=len(self.requests), kv_blocks_total=8, steps_eager=self.steps
        )


BODY = {"prompt": [1, 2, 3], "max_tokens": 3}


def run_app(fake: FakeEngine, test: Any, max_waiting: int = 16, **settings: Any) -> None:
    engine = AsyncEngine(fake, max_waiting)  # type: ignore[arg-type]
    app = build_app(engine, ServerSettings(served_model_names=["fake"], **settings))

    async def main() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                await asyncio.wait_for(test(client, app, engine), 30)

    asyncio.run(main())


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


def test_dead_engine_thread_is_reported() -> None:
    fake = FakeEngine()

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        fake.fail_next = Fatal("gone")
        _error(await client.post("/v1/completions", json=BODY), 503)
        health = await client.get("/health")
        assert health.status_code == 503 and "gone" in health.json()["error"]
        err = _error(await client.post("/v1/completions", json=BODY), 503)
        assert err["code"] == "engine_dead"
        assert "graphwise:engine_alive 0.0" in (await client.get("/metrics")).text

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
