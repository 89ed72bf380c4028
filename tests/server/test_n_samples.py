"""`n` samples per prompt over both OpenAI routes (issue 15), in process against a real engine on
the tiny chat model: choice `prompt * n + i` is the offline engine's sample i (seeded, so the
same tokens), streamed chunks interleave by index and add up to the same texts, and usage counts
each prompt once and every choice's tokens."""

from __future__ import annotations

import json
from typing import Any

import httpx
from fake_engine import run_app

from graphwise import SamplingParams
from graphwise.server.async_engine import AsyncEngine

PROMPTS = ["Once upon a time", "The capital of France is"]
BODY = {"max_tokens": 6, "temperature": 1.0, "seed": 5, "ignore_eos": True}
CHAT = [{"role": "user", "content": "Tell me a story."}]


def _events(resp: httpx.Response) -> list[Any]:
    assert resp.status_code == 200, resp.text
    lines = [line for line in resp.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def _offline(llm, prompt_ids: list[int], n: int, **kw) -> list:
    params = SamplingParams(n=n, **{**BODY, **kw})
    return llm.generate({"prompt_token_ids": prompt_ids}, params, use_tqdm=False)[0].outputs


def test_completions_with_n_index_choices_by_prompt_and_sample(tiny_chat_llm) -> None:
    llm = tiny_chat_llm
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    want = [_offline(llm, i, 3, logprobs=1) for i in ids]
    body = {"prompt": PROMPTS, "n": 3, "logprobs": 1, **BODY}

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        resp = await client.post("/v1/completions", json=body)
        assert resp.status_code == 200, resp.text
        got = resp.json()
        choices = got["choices"]
        assert [c["index"] for c in choices] == list(range(6))
        for c in choices:
            o = want[c["index"] // 3][c["index"] % 3]
            assert (c["text"], c["finish_reason"]) == (o.text, "length")
            assert len(c["logprobs"]["tokens"]) == len(o.token_ids) == 6
        assert len({c["text"] for c in choices}) == 6  # seeds s, s+1, s+2: distinct samples
        assert got["usage"] == {
            "prompt_tokens": sum(map(len, ids)),  # each prompt once, not n times
            "completion_tokens": 6 * 6,
            "total_tokens": sum(map(len, ids)) + 36,
        }
        # Streamed: one choice per chunk, interleaved, adding up to the same choices.
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        *chunks, usage = _events(await client.post("/v1/completions", json=stream))
        assert usage["choices"] == [] and usage["usage"] == got["usage"]
        texts: dict[int, str] = {}
        finished: list[int] = []
        for chunk in chunks:
            (c,) = chunk["choices"]
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"]:
                finished.append(c["index"])
        assert texts == {c["index"]: c["text"] for c in choices}
        assert sorted(finished) == list(range(6))
        first = [chunk["choices"][0]["index"] for chunk in chunks[:6]]
        assert sorted(first) == list(range(6))  # every choice advances in the first steps
        # best_of equal to n asks for nothing more: accepted; more is refused by name.
        same = await client.post("/v1/completions", json={**body, "best_of": 3})
        assert [c["text"] for c in same.json()["choices"]] == [c["text"] for c in choices]
        bad = await client.post("/v1/completions", json={**body, "best_of": 4})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "best_of"
        for n in (0, 129, "2"):
            bad = await client.post("/v1/completions", json={**body, "n": n})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "n", n
        assert engine.engine.block_manager.num_used_blocks == 0

    run_app(llm.llm_engine, test, served="tiny")


def test_chat_with_n_returns_and_streams_each_sample(tiny_chat_llm) -> None:
    llm = tiny_chat_llm
    ids = llm.apply_chat_template(CHAT)
    want = _offline(llm, ids, 2)
    body = {"messages": CHAT, "n": 2, **BODY}

    async def test(client: httpx.AsyncClient, app: Any, engine: AsyncEngine) -> None:
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert [(c["index"], c["message"]["content"]) for c in got["choices"]] == [
            (0, want[0].text),
            (1, want[1].text),
        ]
        assert got["usage"]["completion_tokens"] == 12
        assert got["usage"]["prompt_tokens"] == len(ids)
        chunks = _events(await client.post("/v1/chat/completions", json={**body, "stream": True}))
        roles = [c["choices"][0] for c in chunks[:2]]
        assert [(r["index"], r["delta"]["role"]) for r in roles] == [
            (0, "assistant"),
            (1, "assistant"),
        ]
        content: dict[int, str] = {0: "", 1: ""}
        reasons: dict[int, str] = {}
        for chunk in chunks[2:]:
            (c,) = chunk["choices"]
            content[c["index"]] += c["delta"].get("content") or ""
            if c["finish_reason"]:
                reasons[c["index"]] = c["finish_reason"]
        assert content == {0: want[0].text, 1: want[1].text}
        assert reasons == {0: "length", 1: "length"}

    run_app(llm.llm_engine, test, served="tiny")
