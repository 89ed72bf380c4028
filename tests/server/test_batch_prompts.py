"""Several prompts in one /v1/completions request, in process against the fake engine: one
choice per prompt with its index, usage summed, streams interleaved, all-or-nothing admission,
and one failure or a client leaving ends them all."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from fake_engine import FakeEngine, run_app

from graphwise.server.async_engine import AsyncEngine
from graphwise.server.protocol import MAX_PROMPTS_PER_REQUEST

# FakeEngine: max_model_len 64, one token ("x") per step. Without max_tokens a request runs to
# the context's end, so these finish after 4, 2 and 3 tokens: out of index order.
LENGTHS = [60, 62, 61]
BATCH = {"prompt": [[i + 1] * n for i, n in enumerate(LENGTHS)]}


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def _events(resp: httpx.Response) -> list[Any]:
    lines = [line for line in resp.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


async def _until(check: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_choices_by_index_with_usage_summed() -> None:
    fake = FakeEngine()

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        resp = await client.post("/v1/completions", json=BATCH)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        texts = [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]]
        assert texts == [(0, "xxxx", "length"), (1, "xx", "length"), (2, "xxx", "length")]
        assert body["usage"] == {"prompt_tokens": 183, "completion_tokens": 9, "total_tokens": 192}
        # Each prompt went to the engine as a request of its own, under its own id.
        assert [ids for _, ids, _ in fake.added] == BATCH["prompt"]
        assert len({rid for rid, _, _ in fake.added}) == 3

    run_app(fake, test)


def test_stream_interleaves_choices_then_one_usage_chunk() -> None:
    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        body = {**BATCH, "stream": True, "stream_options": {"include_usage": True}}
        resp = await client.post("/v1/completions", json=body)
        assert resp.status_code == 200, resp.text
        chunks = _events(resp)
        *outputs, usage = chunks
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 9
        assert all(c["usage"] is None and len(c["choices"]) == 1 for c in outputs)
        assert len({c["id"] for c in chunks}) == 1
        text: dict[int, str] = {}
        finished = []
        for c in outputs:
            choice = c["choices"][0]
            text[choice["index"]] = text.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"]:
                finished.append(choice["index"])
        assert text == {0: "xxxx", 1: "xx", 2: "xxx"}
        assert finished == [1, 2, 0]  # as they came, not held back for index order
        indexes = [c["choices"][0]["index"] for c in outputs]
        assert indexes[:3] == [0, 1, 2]  # the first step's tokens, one per prompt

    run_app(FakeEngine(), test)


def test_text_prompts_each_tokenized_with_the_flag() -> None:
    class SpyTokenizer:
        """Encodes a text as [1 if special tokens are added else 2] + one id per word."""

        chat_template = None

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [1 if add_special_tokens else 2] + [5] * len(text.split())

    fake = FakeEngine()
    fake.tokenizer = SpyTokenizer()  # type: ignore[assignment]

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        body = {"prompt": ["one", "two words", "a b c"], "max_tokens": 1}
        assert (await client.post("/v1/completions", json=body)).status_code == 200
        plain = {**body, "prompt": "plain", "add_special_tokens": False}
        assert (await client.post("/v1/completions", json=plain)).status_code == 200
        got = [ids for _, ids, _ in fake.added]
        assert got == [[1, 5], [1, 5, 5], [1, 5, 5, 5], [2, 5]]

    run_app(fake, test)


def test_one_bad_prompt_refuses_the_request_and_submits_nothing() -> None:
    fake = FakeEngine()
    cases = [
        ({"prompt": [[1, 2], [3, 10**9]]}, "prompt.1", None),  # an id out of the vocabulary
        ({"prompt": [[1], [2], [3] * 64]}, "prompt.2", "context_length_exceeded"),
        ({"prompt": [[1], []]}, "prompt.1", None),  # empty
        (
            {"prompt": [[1] * 10, [2] * 60], "max_tokens": 8},
            "max_tokens",
            "context_length_exceeded",
        ),
        ({"prompt": [[1]] * (MAX_PROMPTS_PER_REQUEST + 1)}, "prompt", None),
        ({"prompt": [[1]] * 17}, "prompt", None),  # more than the queue (16) ever holds
    ]

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        for body, param, code in cases:
            err = _error(await client.post("/v1/completions", json=body), 400)
            assert err["param"] == param and (code is None or err["code"] == code), (body, err)
            if param == "max_tokens":
                assert "prompt.1 is 60 tokens" in err["message"]
        assert fake.added == []

    run_app(fake, test)


def test_queue_full_admits_none_of_a_batch() -> None:
    fake = FakeEngine()
    fake.gate.clear()  # steps block: requests stay queued

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        first = asyncio.ensure_future(
            client.post("/v1/completions", json={"prompt": [[1]] * 3, "max_tokens": 2})
        )
        await _until(lambda: engine.num_waiting() >= 3)
        resp = await client.post("/v1/completions", json={"prompt": [[2]] * 2, "max_tokens": 2})
        assert _error(resp, 503)["code"] == "queue_full"
        assert len(fake.added) <= 3 and all(ids == [1] for _, ids, _ in fake.added)
        fake.gate.set()
        assert (await first).status_code == 200

    run_app(fake, test, max_waiting=4)


def test_one_failed_prompt_fails_the_request_and_aborts_the_others(metric) -> None:
    fake = FakeEngine()
    fake.fail_first_token = 99

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        body = {"prompt": [[1, 2], [99, 1], [3]], "max_tokens": 50}
        err = _error(await client.post("/v1/completions", json=body), 500)
        assert err["code"] == "engine_error" and "failed" in err["message"]
        await _until(lambda: not fake.requests)  # the other two were aborted
        text = (await client.get("/metrics")).text
        assert metric(text, "graphwise:request_success_total", 'finished_reason="error"') == 1
        assert metric(text, "graphwise:request_success_total", 'finished_reason="abort"') == 2

        streamed = await client.post("/v1/completions", json={**body, "stream": True})
        assert streamed.status_code == 200
        chunks = _events(streamed)
        assert "error" in chunks[-1] and chunks[-1]["error"]["code"] == "engine_error"
        assert all("error" not in c for c in chunks[:-1])
        await _until(lambda: not fake.requests)
        text = (await client.get("/metrics")).text
        assert metric(text, "graphwise:request_success_total", 'finished_reason="abort"') == 4
        assert (
            await client.post("/v1/completions", json={"prompt": [[1], [2]]})
        ).status_code == 200

    run_app(fake, test)


def test_client_request_id_names_the_response_only() -> None:
    fake = FakeEngine()

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        body = {"prompt": [[1], [2]], "max_tokens": 2, "request_id": "abc"}
        a, b = await asyncio.gather(
            client.post("/v1/completions", json=body), client.post("/v1/completions", json=body)
        )
        assert a.json()["id"] == b.json()["id"] == "cmpl-abc"
        assert len({rid for rid, _, _ in fake.added}) == 4  # the engine's ids stay unique

    run_app(fake, test)


def test_the_largest_batch_is_served() -> None:
    fake = FakeEngine()

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        body = {"prompt": [[i % 100] for i in range(MAX_PROMPTS_PER_REQUEST)], "max_tokens": 1}
        resp = await client.post("/v1/completions", json=body)
        assert resp.status_code == 200, resp.text[:300]
        choices = resp.json()["choices"]
        assert [c["index"] for c in choices] == list(range(MAX_PROMPTS_PER_REQUEST))
        assert [ids for _, ids, _ in fake.added] == body["prompt"]

    run_app(fake, test, max_waiting=MAX_PROMPTS_PER_REQUEST)


def test_a_text_that_cannot_fit_refuses_the_batch_untokenized(default_tokenizer: Any) -> None:
    fake = FakeEngine()
    fake.tokenizer = default_tokenizer  # type: ignore[assignment]
    fake.model_config.vocab_size = len(default_tokenizer)

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        too_long = "hello world " * 1000  # 64-token context: no tokenizing needed to know
        body = {"prompt": ["Hi there", "Hello", too_long]}
        err = _error(await client.post("/v1/completions", json=body), 400)
        assert err["param"] == "prompt.2" and "at least" in err["message"], err
        ok = await client.post("/v1/completions", json={"prompt": ["Hi there", "Hello"]})
        assert ok.status_code == 200
        want = [default_tokenizer.encode(t) for t in ("Hi there", "Hello")]
        assert [ids for _, ids, _ in fake.added] == want

    run_app(fake, test)
