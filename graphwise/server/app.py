"""The FastAPI application: OpenAI's completion, chat and model routes, health and metrics.

Bodies are parsed by hand (not as FastAPI body parameters) so that every kind of bad input,
from invalid UTF-8 to a wrong type, is answered with OpenAI's error JSON and a 400 naming the
field. The body is bounded by what a request that fits the context can need, and a text that
cannot fit is refused before it is tokenized (tokenizing.PromptLimits); tokenization and chat
templates run on worker threads with private copies of the tokenizer, a long prompt's lane
apart from the short ones' (tokenizing.TokenizerLanes): one huge prompt stalls nobody.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from graphwise.engine.validation import (
    InvalidRequest,
    RequestLimits,
    check_prompt_ids,
    check_sampling_params,
)
from graphwise.outputs import RequestOutput
from graphwise.sampling_params import SamplingParams
from graphwise.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineStepError,
    QueueFullError,
    RequestStream,
    ShutdownError,
)
from graphwise.server.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    UsageInfo,
    count_json_nodes,
    new_id,
    shown,
    validation_error,
)
from graphwise.server.tokenizing import PromptLimits, TokenizerLanes, token_bound
from graphwise.tokenizer import render_chat

logger = logging.getLogger(__name__)
Req = TypeVar("Req", bound=BaseModel)


@dataclass
class ServerSettings:
    served_model_names: list[str]
    model_root: str | None = None  # path of the weights, reported as /v1/models' `root`
    api_key: str | None = None
    engine_stop_timeout_s: float = 30.0
    retry_after_s: int = 1
    # The cap on request bodies; the server lowers it to what a request that fits the context
    # can need, when the tokenizer bounds the bytes per token (PromptLimits.body_limit).
    max_body_bytes: int = 32 * 1024 * 1024
    # A client that sends nothing of its body for this long gets a 408 and loses its
    # connection (a trickling client would otherwise hold a request open forever).
    body_idle_timeout_s: float = 30.0


class ServerState:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.draining = False  # set on SIGTERM: new requests get 503 while old ones finish
        self.max_model_len = engine.engine.max_model_len
        self.request_limits: RequestLimits = engine.engine.request_limits
        tokenizer = engine.engine.tokenizer
        self.lanes = TokenizerLanes(tokenizer) if tokenizer is not None else None
        bound, why = token_bound(tokenizer) if tokenizer is not None else (None, "no tokenizer")
        self.limits = PromptLimits(self.max_model_len, bound, text_prompts=tokenizer is not None)
        self.max_body_bytes = self.limits.body_limit(settings.max_body_bytes)
        # A chat message takes about 5 (an object, its keys and values), 5 more per content
        # part; and a template spends tokens on every message, so messages < max_model_len.
        self.max_json_nodes = 8 * self.max_model_len + 256
        self.body_limit_why = (
            "the server's limit"
            if self.max_body_bytes == settings.max_body_bytes
            else f"the most that a request fitting this model's {self.max_model_len}-token "
            "context can need"
        )
        if bound is None and tokenizer is not None:
            logger.info("text prompts are not length-checked before tokenizing: %s", why)
        logger.info(
            "request bodies up to %d bytes (%s)",
            self.max_body_bytes,
            why if bound is not None else "configured",
        )

    def check_open(self, request: Request) -> None:
        """Shutting down? Authorized? Checked before the body is read."""
        if self.draining:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise APIError(
                401,
                "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def resolve_model(self, name: str | None) -> str:
        names = self.settings.served_model_names
        if name is None:
            return names[0]
        if name not in names:
            raise APIError(
                404,
                f"the model {shown(name)} does not exist; this server serves {names[0]!r}",
                param="model",
                code="model_not_found",
            )
        return name

    async def run_tokenizer(
        self, fn: Callable[[Any], list[int]], param: str, size: int
    ) -> list[int]:
        """fn(tokenizer) on a tokenizer thread; `size` (characters) picks its lane."""
        if self.lanes is None:
            raise APIError(
                400,
                "this model has no tokenizer: send the prompt as a list of token ids",
                param=param,
            )
        try:
            return await self.lanes.run(lambda tok: list(fn(tok)), size)
        except APIError:
            raise
        except Exception as exc:  # template errors, odd text: the client's input, not our bug
            reason = str(exc) if len(str(exc)) <= 200 else str(exc)[:197] + "..."
            raise APIError(400, f"could not tokenize {param}: {reason}", param=param) from exc

    def check_request(self, ids: list[int], params: SamplingParams, param: str) -> None:
        """The engine's own admission check (engine/validation.py), answered as a 400 naming the
        field: the prompt's ids, then every id the sampling parameters carry. After the length
        check, so the prompt scan is over at most max_model_len ids."""
        try:
            check_prompt_ids(ids, self.request_limits, param)
            check_sampling_params(params, self.request_limits)
        except InvalidRequest as exc:
            raise APIError(400, str(exc), param=exc.param) from exc

    def submit(self, request_id: str, ids: list[int], params: Any) -> RequestStream:
        try:
            return self.engine.submit(request_id, ids, params)
        except QueueFullError as exc:
            raise APIError(
                503,
                str(exc),
                "server_error",
                code="queue_full",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from exc
        except EngineDeadError as exc:
            raise APIError(503, str(exc), "server_error", code="engine_dead") from exc


async def read_body(
    request: Request, limit: int, idle_timeout_s: float, why: str = "the server's limit"
) -> bytes:
    """The body, refusing (413) before reading it all when it is larger than `limit`, and
    giving up (408) when no byte of it arrives for `idle_timeout_s`."""
    too_large = APIError(413, f"request body is over {limit} bytes ({why})", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    stream = request.stream()
    while True:
        try:
            async with asyncio.timeout(idle_timeout_s):
                chunk = await anext(stream)
        except StopAsyncIteration:
            break
        except ClientDisconnect as exc:
            raise ClientGone("before sending all of its request body") from exc
        except TimeoutError as exc:
            raise APIError(
                408,
                f"no request body bytes arrived for {idle_timeout_s:g} s",
                code="request_timeout",
                headers={"Connection": "close"},
            ) from exc
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(request: Request, model: type[Req], state: ServerState) -> Req:
    raw = await read_body(
        request, state.max_body_bytes, state.settings.body_idle_timeout_s, state.body_limit_why
    )
    nodes = count_json_nodes(raw, state.max_json_nodes)
    if nodes > state.max_json_nodes:
        raise APIError(
            400,
            f"request body holds {nodes} JSON arrays, objects and strings; at most "
            f"{state.max_json_nodes} are accepted",
            code="body_too_complex",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(
            400, f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding"
        ) from exc
    if not text.strip():
        raise APIError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def stream_error(exc: BaseException) -> APIError:
    """The API error for an exception raised while a request was in the engine."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    if isinstance(exc, (EngineDeadError, ShutdownError)):
        return APIError(503, str(exc), "server_error", code="unavailable")
    if isinstance(exc, EngineStepError):
        return APIError(500, str(exc), "server_error", code="engine_error")
    return APIError(500, f"{type(exc).__name__}: {exc}", "server_error", code="internal_error")


_ENGINE_ERRORS = (ValueError, EngineDeadError, EngineStepError, ShutdownError)


class ClientGone(Exception):
    """The client went away; the message says when (for the one line logged about it)."""


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (if it ever comes).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, stream: RequestStream) -> RequestOutput:
    """The final output of a non-streamed request; aborts it if the client goes away."""

    async def last() -> RequestOutput:
        final = None
        async for out in stream.outputs():
            final = out
        assert final is not None
        return final

    work = asyncio.ensure_future(last())
    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            try:
                return work.result()
            except _ENGINE_ERRORS as exc:
                raise stream_error(exc) from exc
        raise ClientGone("while its request was in the engine")
    finally:
        work.cancel()
        gone.cancel()
        stream.close()  # no-op when it finished; otherwise frees its KV blocks now


class EventStream(StreamingResponse):
    """Server-sent events that abort their request however the response ends."""

    def __init__(self, body: AsyncIterator[str], stream: RequestStream) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._stream = stream
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = False
        try:
            await super().__call__(scope, receive, send)
            # Returning early without an error: the client disconnected and starlette
            # cancelled the body (events() itself ends only once its request is done).
            gone = not self._stream.done
        except (ClientDisconnect, OSError):  # a send to a closed connection (ASGI 2.4)
            gone = True
        finally:
            # A disconnect cancels the body mid-iteration (or before it ever started, when a
            # generator's own `finally` would not run): abort here, where it always runs.
            self._stream.close()
            aclose = getattr(self._body, "aclose", None)
            if aclose is not None:
                await aclose()
        if gone:
            client = scope.get("client")
            peer = f"{client[0]}:{client[1]}" if client else "(unknown)"
            logger.info(
                "client %s disconnected mid-stream (%s); request %s aborted",
                peer,
                scope.get("path"),
                self._stream.request_id,
            )


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def events(
    stream: RequestStream,
    first: BaseModel | None,
    chunk: Callable[[RequestOutput], BaseModel | None],
    usage_chunk: Callable[[UsageInfo], BaseModel] | None,
) -> AsyncIterator[str]:
    """One request's SSE: an optional opening chunk, one per output, usage, then [DONE]."""
    if first is not None:
        yield sse(first)
    try:
        async for out in stream.outputs():
            piece = chunk(out)
            if piece is not None:
                yield sse(piece)
            if out.finished and usage_chunk is not None:
                yield sse(usage_chunk(usage_of(out)))
    except _ENGINE_ERRORS as exc:
        yield sse(stream_error(exc).body())
    yield "data: [DONE]\n\n"


def usage_of(out: RequestOutput) -> UsageInfo:
    return UsageInfo.of(len(out.prompt_token_ids), len(out.outputs[0].token_ids))


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "(unknown)"


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    state = ServerState(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start(asyncio.get_running_loop())
        yield
        # uvicorn has drained the connections by now; what is left is failed by the thread.
        if not await asyncio.to_thread(engine.stop, settings.engine_stop_timeout_s):
            logger.warning(
                "engine thread did not stop within %.0f s", settings.engine_stop_timeout_s
            )
        if state.lanes is not None:
            state.lanes.shutdown()

    app = FastAPI(title="graphwise", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.graphwise = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()), skip=1)  # loc starts with "body"/"query"
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), code=str(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: Exception) -> Response:
        # The client's doing, not a server error: one line, no traceback, no 500.
        when = str(exc) if isinstance(exc, ClientGone) else "before its request was read"
        logger.info("client %s disconnected %s (%s)", _peer(request), when, request.url.path)
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        err = APIError(500, f"internal error: {type(exc).__name__}", "server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.alive:
            body = {"status": "error", "error": engine.error or "engine not running"}
            return JSONResponse(body, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = engine.metrics.render()
        return Response(body, media_type=content_type)

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, root=settings.model_root, max_model_len=state.max_model_len)

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        state.check_open(request)
        body = ModelList(data=[card(n) for n in settings.served_model_names])
        return JSONResponse(body.model_dump())

    @app.get("/v1/models/{model:path}")
    async def get_model(request: Request, model: str) -> JSONResponse:
        state.check_open(request)
        return JSONResponse(card(state.resolve_model(model)).model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        state.check_open(request)
        req = await parse_body(request, CompletionRequest, state)
        model = state.resolve_model(req.model)
        req.check_supported()
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            state.limits.check_text(prompt, "prompt")  # before tokenizing: bounded, C speed
            ids = await state.run_tokenizer(
                lambda tok: tok.encode(prompt, add_special_tokens=True), "prompt", len(prompt)
            )
        else:
            ids = list(prompt)
        params = req.to_sampling_params(len(ids), state.max_model_len)
        state.check_request(ids, params, "prompt")
        rid, created = new_id("cmpl"), int(time.time())
        stream = state.submit(rid, ids, params)

        def choice(out: RequestOutput, text: str) -> CompletionChoice:
            o = out.outputs[0]
            done = out.finished
            return CompletionChoice(
                text=text,
                finish_reason=o.finish_reason if done else None,
                stop_reason=o.stop_reason if done else None,
            )

        if req.stream:

            def chunk(out: RequestOutput) -> BaseModel | None:
                if not out.delta_text and not out.finished:
                    return None  # held back (a partial UTF-8 char, a possible stop string)
                c = choice(out, out.delta_text)
                return CompletionResponse(id=rid, created=created, model=model, choices=[c])

            def usage_chunk(usage: UsageInfo) -> BaseModel:
                return CompletionResponse(
                    id=rid, created=created, model=model, choices=[], usage=usage
                )

            body = events(stream, None, chunk, usage_chunk if req.include_usage else None)
            return EventStream(body, stream)
        out = await collect(request, stream)
        resp = CompletionResponse(
            id=rid,
            created=created,
            model=model,
            choices=[choice(out, out.outputs[0].text)],
            usage=usage_of(out),
        )
        return JSONResponse(resp.model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        state.check_open(request)
        req = await parse_body(request, ChatCompletionRequest, state)
        model = state.resolve_model(req.model)
        req.check_supported()
        conversation = [m.template_dict() for m in req.messages]

        def tokenize_chat(tok: Any) -> list[int]:
            text = render_chat(tok, conversation, req.add_generation_prompt)
            state.limits.check_text(text, "messages")
            return tok.encode(text, add_special_tokens=False)

        size = sum(len(m["content"]) for m in conversation)
        ids = await state.run_tokenizer(tokenize_chat, "messages", size)
        params = req.to_sampling_params(len(ids), state.max_model_len)
        state.check_request(ids, params, "messages")
        rid, created = new_id("chatcmpl"), int(time.time())
        stream = state.submit(rid, ids, params)

        if req.stream:

            def make(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> BaseModel:
                return ChatCompletionChunk(
                    id=rid, created=created, model=model, choices=choices, usage=usage
                )

            def chunk(out: RequestOutput) -> BaseModel | None:
                if not out.delta_text and not out.finished:
                    return None
                delta = DeltaMessage(content=out.delta_text or None)
                reason = out.outputs[0].finish_reason if out.finished else None
                return make([ChatStreamChoice(delta=delta, finish_reason=reason)])

            first = make([ChatStreamChoice(delta=DeltaMessage(role="assistant", content=""))])
            usage_chunk = (lambda u: make([], u)) if req.include_usage else None
            return EventStream(events(stream, first, chunk, usage_chunk), stream)
        out = await collect(request, stream)
        o = out.outputs[0]
        resp = ChatCompletionResponse(
            id=rid,
            created=created,
            model=model,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=o.text),
                    finish_reason=o.finish_reason,
                    stop_reason=o.stop_reason,
                )
            ],
            usage=usage_of(out),
        )
        return JSONResponse(resp.model_dump())

    return app
