"""A scripted stand-in for LLMEngine, and a runner for in-process tests of the app against it."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import httpx

from graphwise.engine.client import EngineStats
from graphwise.engine.validation import RequestLimits
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
    alive = True

    def __init__(self) -> None:
        self.model_config = SimpleNamespace(vocab_size=100)
        self.steps = 0
        self.requests: dict[str, tuple[list[int], Any, list[int]]] = {}
        self.fail_next: BaseException | None = None
        self.fail_request: str | None = None  # the next request's output is this error
        self.gate = threading.Event()  # steps wait for it: lets tests keep requests queued
        self.gate.set()
        self.stats: dict[str, int] = {}  # more EngineStats fields for get_stats to report
        self.added: list[tuple[str, list[int], Any]] = []  # every add_request, in order
        self.aborted: list[str] = []  # requests aborted while the engine held them
        self.fail_first_token: int | None = None  # a request whose prompt starts so fails

    @property
    def request_limits(self) -> RequestLimits:
        return RequestLimits(self.model_config.vocab_size, self.max_model_len)

    def add_request(self, prompt: Any, params: Any, prompt_token_ids: list[int], request_id: str):
        self.requests[request_id] = (prompt_token_ids, params, [])
        self.added.append((request_id, prompt_token_ids, params))

    def abort_request(self, request_id: str) -> bool:
        if self.requests.pop(request_id, None) is None:
            return False
        self.aborted.append(request_id)
        return True

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
            fails = self.fail_first_token is not None and prompt[:1] == [self.fail_first_token]
            if self.fail_request is not None or fails:
                del self.requests[rid]
                failed = RequestOutput(
                    rid, None, prompt, [CompletionOutput(0, "", [], "error")], True
                )
                failed.error = self.fail_request or f"request {rid} failed"
                outs.append(failed)
                continue
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
            num_waiting=len(self.requests), kv_blocks_total=8, steps_eager=self.steps, **self.stats
        )


BODY = {"prompt": [1, 2, 3], "max_tokens": 3}


def run_app(
    fake: FakeEngine, test: Any, max_waiting: int = 16, served: str = "fake", **settings: Any
) -> None:
    engine = AsyncEngine(fake, max_waiting, served)  # type: ignore[arg-type]
    app = build_app(engine, ServerSettings(served_model_names=[served], **settings))

    async def main() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                await asyncio.wait_for(test(client, app, engine), 30)

    asyncio.run(main())
