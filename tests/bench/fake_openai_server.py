"""A fake OpenAI-compatible streaming server (plain asyncio), for the client and sweep tests.

In-process: `FakeOpenAIServer(FakeServerConfig(...)).start()` serves from a thread.
As a process (what `bench sweep` tests start in place of `graphwise serve`):
    python fake_openai_server.py --port N [--ignore-sigterm] [--spawn-child] [--exit-code K]
It serves 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakeServerConfig:
    model_id: str = "SmolLM2-135M-Instruct"
    ttft_s: float = 0.0  # delay before the first token chunk
    gap_s: float = 0.0  # delay between token chunks
    usage: bool = True  # honour stream_options.include_usage
    fail_every: int = 0  # every k-th POST (1-based; the warm-up is the first) fails
    fail_mode: str = "http500"  # http500 | stream_error | no_done | drop
    role_chunk: bool = True  # chat: an initial role-only chunk
    api_key: str | None = None  # require 'Authorization: Bearer KEY' on /v1 routes
    received: list[dict[str, Any]] = field(default_factory=list)
    max_in_flight: int = 0  # the most POSTs answered at once (what a client's cap allows)


class FakeOpenAIServer:
    """A minimal OpenAI-compatible streaming server on plain asyncio, in its own thread.

    Token i streams as the text " w{i}"; usage reports one completion token per chunk. A prompt
    containing FAIL_HTTP500 / FAIL_STREAM_ERROR / FAIL_NO_DONE / FAIL_DROP fails that way.
    """

    def __init__(self, config: FakeServerConfig, port: int = 0) -> None:
        self.config = config
        self.port = port
        self._posts = 0
        self._in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake server did not start")

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self._in_flight += 1
                self.config.max_in_flight = max(self.config.max_in_flight, self._in_flight)
                try:
                    if not await self._respond(method, path, body, writer, headers):
                        break
                finally:
                    self._in_flight -= 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _send(writer, status: str, payload: bytes, ctype="application/json") -> None:
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()

    async def _respond(self, method: str, path: str, body: bytes, writer, headers) -> bool:
        cfg = self.config
        if cfg.api_key and path.startswith("/v1/"):
            if headers.get("authorization") != f"Bearer {cfg.api_key}":
                await self._send(writer, "401 Unauthorized", b'{"error": "invalid api key"}')
                return True
        if method == "GET" and path == "/health":
            await self._send(writer, "200 OK", b"")
            return True
        if method == "GET" and path == "/v1/models":
            data = {"object": "list", "data": [{"id": cfg.model_id, "object": "model"}]}
            await self._send(writer, "200 OK", json.dumps(data).encode())
            return True
        if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            await self._send(writer, "404 Not Found", b'{"error": "not found"}')
            return True
        request = json.loads(body)
        cfg.received.append(request)
        self._posts += 1
        chat = path.endswith("chat/completions")
        prompt = request["messages"][-1]["content"] if chat else request["prompt"]
        mode = next(
            (
                m
                for m in ("http500", "stream_error", "no_done", "drop")
                if f"FAIL_{m.upper()}" in prompt
            ),
            None,
        )
        if mode is None and cfg.fail_every and self._posts % cfg.fail_every == 0:
            mode = cfg.fail_mode
        if mode == "http500":
            await self._send(writer, "500 Internal Server Error", b'{"error": "boom"}')
            return True
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )

        async def event(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            frame = f"data: {data}\n\n".encode()
            writer.write(f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
            await writer.drain()

        n = int(request.get("max_tokens") or 16)
        if chat and cfg.role_chunk:
            await event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for i in range(n):
            await asyncio.sleep(cfg.ttft_s if i == 0 else cfg.gap_s)
            if mode == "drop" and i == 1:
                writer.write(b"ff\r\npartial")  # truncated chunk, then the connection closes
                await writer.drain()
                return False
            if mode == "stream_error" and i == 1:
                await event({"error": {"message": "engine exploded", "code": 500}})
                break
            text = f" w{i}"
            choice = (
                {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            )
            await event({"choices": [choice]})
        if mode != "stream_error":
            done = {"index": 0, "finish_reason": "length"}
            done.update({"delta": {}} if chat else {"text": ""})
            await event({"choices": [done]})
        wants_usage = (request.get("stream_options") or {}).get("include_usage")
        if cfg.usage and wants_usage and mode != "stream_error":
            usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": n + 7}
            await event({"choices": [], "usage": usage})
        if mode != "no_done":
            await event("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--spawn-child", action="store_true", help="a child that ignores SIGTERM")
    parser.add_argument("--exit-code", type=int, default=None, help="exit at once with this code")
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument(
        "--pid-file", default=None, help="append this process's and the child's pids"
    )
    args, _ = parser.parse_known_args(argv)
    print("fake server starting", flush=True)
    if args.exit_code is not None:
        print("fake server: fatal error on purpose", flush=True)
        return args.exit_code
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids = [os.getpid()]
    if args.spawn_child:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)",
            ]
        )
        pids.append(child.pid)
    if args.pid_file:
        with open(args.pid_file, "a") as f:
            f.write("\n".join(map(str, pids)) + "\n")
    time.sleep(args.startup_delay)
    server = FakeOpenAIServer(FakeServerConfig(gap_s=0.002), port=args.port)
    server.start()
    print(f"fake server ready on {server.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
