"""Fuzzing the request layer: random JSON shapes, types, extreme numbers, unicode and id lists
against the routes (protocol validation included), in process, with the embedded tokenizer and
a fake engine. Every input must get a 2xx, or a 4xx with OpenAI's error body: never a 5xx,
an exception, or an error logged."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fake_engine import FakeEngine
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from graphwise.server.app import ServerSettings, build_app
from graphwise.server.async_engine import AsyncEngine

MAX_MODEL_LEN = 64
FUZZ = settings(
    max_examples=int(os.environ.get("GRAPHWISE_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class InProcessServer:
    """The app on an event loop in a thread of its own, called from hypothesis' sync tests."""

    def __init__(self, tokenizer: Any) -> None:
        fake = FakeEngine()
        fake.tokenizer = tokenizer  # type: ignore[misc]
        fake.max_model_len = MAX_MODEL_LEN  # type: ignore[misc]
        fake.model_config.vocab_size = len(tokenizer)
        self.fake = fake
        self.app = build_app(AsyncEngine(fake, 64), ServerSettings(served_model_names=["fake"]))  # type: ignore[arg-type]
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),))
        self._thread.start()
        assert self._ready.wait(30), "app did not start"

    async def _serve(self) -> None:
        self._stop = self.loop.create_future()
        async with self.app.router.lifespan_context(self.app):
            transport = httpx.ASGITransport(app=self.app)  # app exceptions reach the caller
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                self.client = client
                self._ready.set()
                await self._stop

    def post(self, path: str, content: bytes) -> httpx.Response:
        coro = self.client.post(path, content=content, headers={"content-type": "application/json"})
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set_result, None)  # type: ignore[union-attr]
        self._thread.join(30)
        self.loop.close()


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server(default_tokenizer: Any) -> Iterator[InProcessServer]:
    srv = InProcessServer(default_tokenizer)
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    srv.errors = errors  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        logging.getLogger().removeHandler(errors)
        srv.close()


# ------------------------------------------------------------------------------ strategies
BIG_INTS = st.sampled_from(
    [0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
)
INTS = st.one_of(st.integers(-5, 100), BIG_INTS, st.integers())
FLOATS = st.one_of(
    st.floats(),  # nan and +-inf too: json.dumps writes NaN / Infinity, which is not JSON
    st.sampled_from(
        [0.0, -0.0, 1e-40, 5e-324, 1e-5, 0.99999, 1.0, 2.0, 1e308, 1.7976931348623157e308]
    ),
)
SPECIAL_TEXT = st.sampled_from(
    ["", " ", "\x00", "\x04" * 40, "\U0010ffff", "<|im_start|>", "<|im_end|>",
     "{{ raise_exception('x') }}", "{% for %}", "é" * 30, "\n" * 50, "🙂", "A" * 300,
     "fake" * 500]
)  # fmt: skip
TEXT = st.one_of(st.text(max_size=40), SPECIAL_TEXT)
# Lone surrogates: Python writes them as JSON escapes, which the server must refuse.
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT, st.just("\ud800"))
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)


VALID_IDS = st.lists(st.integers(0, 49151), min_size=1, max_size=40)
# Values the server should accept (some combinations still fail, e.g. min_tokens > max_tokens).
SAMPLING = {
    "model": st.sampled_from(["fake", None]),  # (TEXT, among the hostile values, is any name)
    "max_tokens": st.one_of(st.none(), st.integers(0, 70)),  # 0: with echo only
    "temperature": st.one_of(st.none(), st.floats(0, 2), st.sampled_from([1e-40, 5e-324, 1e-5])),
    "top_p": st.one_of(st.none(), st.floats(5e-324, 1), st.just(1)),
    "top_k": st.one_of(st.none(), st.just(-1), st.integers(1, 2**63)),
    "min_tokens": st.integers(0, 8),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)),
    "n": st.just(1),
    "stop": st.one_of(st.none(), TEXT, st.lists(TEXT, max_size=4)),
    "stop_token_ids": st.one_of(st.none(), st.lists(st.integers(0, 49151), max_size=8)),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.booleans()})),
    "user": TEXT,
    "logprobs": st.sampled_from([None, False]),  # the defaults of what is not implemented
    "echo": st.sampled_from([None, False, True]),
    "prompt_logprobs": st.sampled_from([None, 0, 2]),
    "response_format": st.sampled_from([None, {"type": "text"}]),
    "presence_penalty": st.sampled_from([None, 0, 0.0, 0.5]),  # 0.5: refused by name
    "priority": st.sampled_from([0, 1]),
    "request_id": st.one_of(TEXT, st.text(max_size=300)),
    "add_special_tokens": st.booleans(),
    "service_tier": TEXT,  # accepted and ignored
}
# Values of the wrong type, out of range, or absurd, for any field.
HOSTILE = st.one_of(
    ANY_JSON,
    INTS,
    FLOATS,
    st.lists(INTS, max_size=1100),
    st.lists(TEXT, max_size=70),
    st.lists(st.lists(INTS, max_size=3), max_size=3),
)
COMPLETION_FIELDS = {
    "prompt": st.one_of(
        TEXT,
        VALID_IDS,
        st.lists(TEXT, min_size=1, max_size=2),
        st.lists(VALID_IDS, min_size=1, max_size=2),
    ),
    **SAMPLING,
}


def _rarely_hostile(plausible: st.SearchStrategy) -> st.SearchStrategy:
    # Not one_of(plausible x 9, HOSTILE): hypothesis does not weight repeated branches.
    return st.integers(0, 15).flatmap(lambda k: HOSTILE if k == 0 else plausible)


PART = _rarely_hostile(
    st.fixed_dictionaries(
        {"type": _rarely_hostile(st.just("text")), "text": _rarely_hostile(TEXT)},
        optional={"image_url": HOSTILE},
    )
)
MESSAGE = _rarely_hostile(
    st.fixed_dictionaries(
        {
            "role": _rarely_hostile(
                st.sampled_from(["system", "developer", "user", "assistant", "tool"])
            ),
            "content": _rarely_hostile(st.one_of(st.none(), TEXT, st.lists(PART, max_size=3))),
        },
        optional={"name": _rarely_hostile(TEXT), "tool_calls": HOSTILE},
    )
)
CHAT_FIELDS = {
    "messages": st.lists(MESSAGE, min_size=1, max_size=4),
    "max_completion_tokens": st.one_of(st.none(), st.integers(1, 70)),
    "add_generation_prompt": st.booleans(),
    "continue_final_message": st.booleans(),
    "chat_template_kwargs": st.one_of(
        st.none(),
        st.dictionaries(
            st.one_of(TEXT, st.sampled_from(["tokenize", "messages", "tools", "bos_token"])),
            ANY_JSON,
            max_size=3,
        ),
    ),
    "documents": st.one_of(st.none(), st.lists(st.dictionaries(TEXT, TEXT, max_size=2))),
    "reasoning_effort": st.one_of(st.none(), TEXT),
    **SAMPLING,
}


@st.composite
def requests(draw: st.DrawFn, fields: dict[str, st.SearchStrategy], required: str) -> dict:
    """A plausible request (a random subset of fields), then, often, one or two fields
    replaced by something hostile, or one left out."""
    names = sorted(fields)
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=6))
    body = {name: draw(fields[name]) for name in {required, *chosen}}
    for _ in range(draw(st.integers(0, 2))):
        body[draw(st.sampled_from([*names, "unknown_field"]))] = draw(HOSTILE)
    if draw(st.integers(0, 9)) == 0:
        body.pop(draw(st.sampled_from(sorted(body))), None)
    return body


def _encode(body: Any, compact: bool) -> bytes:
    text = json.dumps(body)  # NaN and Infinity as Python writes them (not JSON)
    if compact:
        text = json.dumps(body, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


@st.composite
def bodies(draw: st.DrawFn, shape: st.SearchStrategy) -> bytes:
    """A request of `shape` (mostly), any JSON at all, or broken bytes (cut, or random)."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return _encode(draw(ANY_JSON), draw(st.booleans()))
    if kind == 1:
        return draw(st.binary(min_size=1, max_size=64))
    body = _encode(draw(shape), draw(st.booleans()))
    if kind == 2:
        return body[: draw(st.integers(1, len(body) - 1))]
    return body


# ----------------------------------------------------------------------------------- checks
def check_response(resp: httpx.Response) -> None:
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and 0 < len(err["message"]) <= 400, err
        assert err["type"] == "invalid_request_error", err
        assert err["param"] is None or isinstance(err["param"], str)
        return
    if resp.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in resp.text.split("\n\n") if line]
        assert events and events[-1] == "data: [DONE]", resp.text[-200:]
        for event in events[:-1]:
            assert event.startswith("data: ")
            chunk = json.loads(event[len("data: ") :])
            assert "error" not in chunk, chunk
        return
    body = resp.json()
    choices = body["choices"]  # one per prompt of a batch, each fitting the context
    assert [c["index"] for c in choices] == list(range(len(choices))) and choices
    assert body["usage"]["total_tokens"] <= MAX_MODEL_LEN * len(choices)


def _run(server: InProcessServer, path: str, body: bytes) -> httpx.Response:
    resp = server.post(path, body)
    check_response(resp)
    errors = server.errors.records  # type: ignore[attr-defined]
    assert not errors, [r.getMessage() for r in errors]
    return resp


def _count(resp: httpx.Response) -> None:
    """What the examples reached (pytest --hypothesis-show-statistics shows it)."""
    event(f"HTTP {resp.status_code}")
    if resp.status_code >= 400:
        event(f"param {resp.json()['error']['param']}")


@FUZZ
@given(body=bodies(requests(COMPLETION_FIELDS, "prompt")))
def test_fuzz_completions(server: InProcessServer, body: bytes) -> None:
    _count(_run(server, "/v1/completions", body))


@FUZZ
@given(body=bodies(requests(CHAT_FIELDS, "messages")))
def test_fuzz_chat_completions(server: InProcessServer, body: bytes) -> None:
    _count(_run(server, "/v1/chat/completions", body))


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi", "temperature": math.nan},
        {"prompt": "hi", "top_p": math.inf},
        {"prompt": "hi", "temperature": 1e308, "top_k": 2**63},
        {"prompt": "hi", "seed": -(2**63)},
        {"prompt": [49151], "max_tokens": 63, "min_tokens": 63, "stream": True},
        {"prompt": "\x04" * 40},  # the tokenizer drops every byte: an empty prompt
        {"prompt": "<|im_start|>" * 70},  # special tokens count too
        {"prompt": "hi", "model": "m" * 20_000},
    ],
)
def test_edge_requests(server: InProcessServer, body: dict[str, Any]) -> None:
    resp = _run(server, "/v1/completions", json.dumps(body).encode())
    if resp.status_code >= 400:
        assert len(resp.content) < 2048  # an error never echoes a whole field back


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": ' + b"[" * 700 + b"]" * 700 + b"}",  # deeper than the parser recurses
        b'{"prompt": "hi", "max_tokens": 1e999999}',
        b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
        b'{"prompt": "hi", "temperature": -0}',
        b'{"prompt": [1], "prompt": "hi"}',  # a duplicate key: the last one wins
        b'\xef\xbb\xbf{"prompt": "hi"}',  # a UTF-8 byte order mark
        b'{"prompt": "hi"}' + b" " * 10_000 + b"\n",
        b'{"prompt": "hi"} {"prompt": "again"}',
        b'{"prompt": "hi", "\\u0000": 1, "stream_options": {"include_usage": "yes"}}',
        b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
    ],
)
def test_edge_bodies(server: InProcessServer, raw: bytes) -> None:
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    _run(server, path, raw)
