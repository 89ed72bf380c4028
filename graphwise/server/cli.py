"""`graphwise serve`: load the model, then answer OpenAI's API over HTTP with uvicorn.

The port is bound before the model loads, so a taken port fails in a second rather than after
the load. SIGTERM (or Ctrl-C) drains: new requests get 503, in-flight ones finish (bounded by
--shutdown-timeout), the engine thread is joined, and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import uvicorn

from graphwise.config import add_engine_args, engine_config_from_args

logger = logging.getLogger("graphwise.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    g.add_argument(
        "--api-key",
        default=os.environ.get("GRAPHWISE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default $GRAPHWISE_API_KEY)",
    )
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="name(s) clients send as `model`; the first is reported (default: the model's)",
    )
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=4096,
        help="requests allowed to wait for a batch slot before new ones get 503",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds to let in-flight requests finish on SIGTERM before cancelling them",
    )
    g.add_argument("--disable-access-log", action="store_true", help="no line per request")
    g.add_argument(
        "--tool-call-parser",
        default=None,
        help="how tool_choice 'auto' finds tool calls in the output: hermes (<tool_call> JSON) "
        "or llama3_json (vLLM's names); without it 'auto' is refused",
    )
    g.add_argument(
        "--reasoning-parser",
        default=None,
        help="split chat replies of models that think in <think>...</think> into "
        "reasoning_content and content, and start output constraints after the reasoning: "
        "deepseek_r1 (the reply begins inside the reasoning) or qwen3 (it reasons only if it "
        "begins with <think>); vLLM's names",
    )
    g.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="accepted for vLLM compatibility: --tool-call-parser alone enables 'auto'",
    )
    add_engine_args(parser)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc}") from exc
    return sock


def _model_root(args: argparse.Namespace) -> str | None:
    if args.model is not None:
        return str(Path(args.model).expanduser().resolve())
    if args.preset is not None:
        return None
    from graphwise.models.default import default_model_path

    return str(default_model_path())


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_waiting_requests < 1:
        raise ValueError(f"--max-waiting-requests must be >= 1, got {args.max_waiting_requests}")
    if args.shutdown_timeout <= 0:
        raise ValueError(f"--shutdown-timeout must be positive, got {args.shutdown_timeout}")
    if args.tool_call_parser is not None:
        from graphwise.server.tools import make_parser

        make_parser(args.tool_call_parser)  # an unknown name fails here, naming the known ones
    if args.reasoning_parser is not None:
        from graphwise.server.reasoning import make_reasoning_parser

        make_reasoning_parser(args.reasoning_parser)  # the same: fails before the model loads
    config = engine_config_from_args(args)  # bad engine options fail before anything else
    from graphwise.executor.worker import is_torchrun_worker, run_torchrun_worker

    if is_torchrun_worker():
        # A torchrun job runs this command on every rank: the others serve as model workers
        # and never bind the HTTP port.
        run_torchrun_worker(config)
        return 0
    sock = _bind(args.host, args.port)

    from graphwise.engine.client import create_engine_client
    from graphwise.server.app import ServerSettings, build_app
    from graphwise.server.async_engine import AsyncEngine

    try:
        engine = create_engine_client(config)  # an LLMEngine, or a data-parallel front
    except BaseException:
        sock.close()
        raise
    served_model_names = list(args.served_model_name or [engine.model_name])
    async_engine = AsyncEngine(engine, args.max_waiting_requests, served_model_names[0])
    settings = ServerSettings(
        served_model_names=served_model_names,
        model_root=_model_root(args),
        api_key=args.api_key or None,
        engine_stop_timeout_s=args.shutdown_timeout,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
    )
    app = build_app(async_engine, settings)
    host, port = sock.getsockname()[:2]
    uv_config = uvicorn.Config(
        app,
        log_level=str(getattr(args, "log_level", "info")).lower(),
        access_log=not args.disable_access_log,
        timeout_graceful_shutdown=args.shutdown_timeout,
        lifespan="on",
    )
    url = f"http://{_url_host(host)}:{port}"
    server = _Server(uv_config, app.state.graphwise, url, settings.served_model_names[0])
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # handlers that would kill us (exit -15) after a clean drain. No-op handlers let run() end.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _after_shutdown)
    server.run(sockets=[sock])
    if not server.started:
        return 1
    if async_engine.error is not None:
        logger.error("exiting after an engine failure: %s", async_engine.error)
        return 1
    return 0


def _after_shutdown(signum: int, frame: Any) -> None:
    pass


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _Server(uvicorn.Server):
    """uvicorn.Server that marks the app as draining the moment a signal arrives."""

    def __init__(self, config: uvicorn.Config, state: Any, url: str, name: str) -> None:
        super().__init__(config)
        self._state, self._url, self._name = state, url, name

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._state.draining = True  # new requests get 503 from now on
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            url = self._url
            logger.info("graphwise serves %r at %s/v1 (health: %s/health)", self._name, url, url)
