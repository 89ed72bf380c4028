"""Clients that go away or stall, against a real uvicorn on loopback and a fake engine: each
case is one INFO line, with no traceback, no 500, and nothing left in the engine."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvicorn
from fake_engine import FakeEngine

from graphwise.server.app import ServerSettings, build_app
from graphwise.server.async_engine import AsyncEngine

IDLE_TIMEOUT_S = 0.5


class SlowEngine(FakeEngine):
    """Steps every 20 ms, so requests stay in flight long enough to walk away from."""

    def step(self):  # noqa: ANN201
        time.sleep(0.02)
        return super().step()


@dataclass
class LiveServer:
    port: int
    fake: SlowEngine

    def send(self, data: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.sendall(data)
        return sock


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    fake = SlowEngine()
    settings = ServerSettings(served_model_names=["fake"], body_idle_timeout_s=IDLE_TIMEOUT_S)
    app = build_app(AsyncEngine(fake, 64), settings)  # type: ignore[arg-type]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # log_config=None: uvicorn's records propagate to the root logger, where caplog sees them.
    config = uvicorn.Config(app, log_config=None, access_log=True, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield LiveServer(sock.getsockname()[1], fake)
    finally:
        server.should_exit = True
        thread.join(10)


def _post(body: bytes, length: int | None = None, stream: bool = False) -> bytes:
    length = len(body) if length is None else length
    return b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % length + body


def _body(stream: bool = False, max_tokens: int = 60, prompts: int = 0) -> bytes:
    """One prompt, or a batch of `prompts`."""
    prompt = [[1, 2, 3]] * prompts if prompts else [1, 2, 3]
    return json.dumps({"prompt": prompt, "max_tokens": max_tokens, "stream": stream}).encode()


def _wait_for(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
        time.sleep(0.02)


def _assert_quiet(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """One INFO line saying `text`; nothing at ERROR, no traceback, no 500 logged."""
    lines = [r for r in caplog.records if text in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO, lines
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not [r for r in caplog.records if '" 500' in r.getMessage()]


def _wait_engine_empty(fake: FakeEngine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while fake.requests:
        assert time.monotonic() < deadline, f"requests left in the engine: {list(fake.requests)}"
        time.sleep(0.02)


def _assert_all_aborted(fake: FakeEngine, n: int) -> None:
    """The last request's n prompts were aborted, not left to finish."""
    last = [rid for rid, _, _ in fake.added[-n:]]
    assert set(last) <= set(fake.aborted), (last, fake.aborted[-n:])


@pytest.mark.parametrize(
    "partial",
    [
        _post(_body()[:10], length=1000),  # part of a declared body
        _post(b"", length=100),  # headers only
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"pro\r\n',  # part of a chunked body
    ],
    ids=["content-length", "headers-only", "chunked"],
)
def test_disconnect_while_sending_the_body(
    live: LiveServer, caplog: pytest.LogCaptureFixture, partial: bytes
) -> None:
    caplog.set_level(logging.INFO)
    live.send(partial).close()
    _wait_for(caplog, "disconnected before sending all of its request body")
    time.sleep(0.1)  # anything uvicorn would log about it comes right after
    _assert_quiet(caplog, "disconnected before sending all of its request body")
    assert not live.fake.requests


@pytest.mark.parametrize("prompts", [0, 3], ids=["one-prompt", "batch"])
def test_disconnect_mid_stream_aborts_the_request(
    live: LiveServer, caplog: pytest.LogCaptureFixture, prompts: int
) -> None:
    caplog.set_level(logging.INFO)
    sock = live.send(_post(_body(stream=True, prompts=prompts)))
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    # A reset rather than a polite close: what a killed client or a dropped link looks like.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    _wait_for(caplog, "disconnected mid-stream")
    _wait_engine_empty(live.fake)
    _assert_quiet(caplog, "disconnected mid-stream")
    _assert_all_aborted(live.fake, max(prompts, 1))


@pytest.mark.parametrize("prompts", [0, 3], ids=["one-prompt", "batch"])
def test_disconnect_while_waiting_for_a_whole_response(
    live: LiveServer, caplog: pytest.LogCaptureFixture, prompts: int
) -> None:
    caplog.set_level(logging.INFO)
    sock = live.send(_post(_body(prompts=prompts)))
    deadline = time.monotonic() + 5
    while len(live.fake.requests) < max(prompts, 1):  # in the engine now
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sock.close()
    _wait_for(caplog, "disconnected while its request was in the engine")
    _wait_engine_empty(live.fake)
    _assert_quiet(caplog, "disconnected while its request was in the engine")
    _assert_all_aborted(live.fake, max(prompts, 1))


def test_a_stalled_body_gets_408_and_the_connection_closes(live: LiveServer) -> None:
    sock = live.send(_post(b'{"prompt": ', length=100))
    start = time.monotonic()
    reply = b""
    while chunk := sock.recv(4096):  # until the server closes
        reply += chunk
    assert IDLE_TIMEOUT_S <= time.monotonic() - start < IDLE_TIMEOUT_S + 5
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_send_failing_under_asgi_2_4_is_a_quiet_disconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Starlette turns an OSError from send() into ClientDisconnect under ASGI 2.4; after the
    # response has started, no exception handler can answer it, so the stream must absorb it.
    caplog.set_level(logging.INFO)
    fake = SlowEngine()
    engine = AsyncEngine(fake, 8)  # type: ignore[arg-type]
    app = build_app(engine, ServerSettings(served_model_names=["fake"]))
    body = _body(stream=True)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-length", str(len(body)).encode()), (b"host", b"t")],
        "client": ("127.0.0.1", 5555),
        "server": ("127.0.0.1", 80),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # the client says nothing more
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and sent:
            raise OSError("connection reset by peer")
        sent.append(message)

    async def main() -> None:
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app(scope, receive, send), 10)
            deadline = time.monotonic() + 5
            while fake.requests:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)

    asyncio.run(main())
    assert sent[0]["status"] == 200
    _assert_quiet(caplog, "disconnected mid-stream")
