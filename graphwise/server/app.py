"""The FastAPI application: OpenAI's completion, chat and model routes, health and metrics.

Bodies are parsed by hand (not as FastAPI body parameters) so that every kind of bad input,
from invalid UTF-8 to a wrong type, is answered with OpenAI's error JSON and a 400 naming the
field; a field asking for what is not implemented is refused by name (protocol.REQUEST_FIELDS).
The body is bounded by what a request of prompts that fit the context can need, and a text that
cannot fit is refused before it is tokenized (tokenizing.PromptLimits); tokenization and chat
templates run on worker threads with private copies of the tokenizer, a long prompt's lane
apart from the short ones' (tokenizing.TokenizerLanes): one huge prompt stalls nobody.

/v1/completions takes a batch of prompts (a list of texts or of id lists): each is checked like a
single one and becomes an engine request of its own and a choice with its index; they are
admitted, aborted and failed together.
"""

from __future__ import annotations

import asyncio
import dataclasses
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

from graphwise.engine.reasoning import ReasoningPhase
from graphwise.engine.validation import (
    InvalidRequest,
    RequestLimits,
    check_prompt_ids,
    check_sampling_params,
)
from graphwise.outputs import (
    CompletionOutput,
    PromptLogprobList,
    RequestOutput,
    SampleLogprob,
)
from graphwise.sampling_params import ReasoningSpec, SamplingParams
from graphwise.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineStepError,
    QueueFullError,
    RequestStream,
    ShutdownError,
    group_outputs,
)
from graphwise.server.logprobs import chat_logprobs, completion_logprobs, prompt_logprobs_json
from graphwise.server.protocol import (
    MAX_PROMPTS_PER_REQUEST,
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
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
from graphwise.server.reasoning import (
    CONTENT,
    OPTIONAL,
    ReasoningStream,
    make_reasoning_parser,
    reasoning_tag_ids,
)
from graphwise.server.tokenizing import PromptLimits, TokenizerLanes, token_bound
from graphwise.server.tools import ToolStream, constrain_for_tools, plan_tools
from graphwise.tokenizer import render_chat, template_kwarg_conflicts

logger = logging.getLogger(__name__)
Req = TypeVar("Req", bound=BaseModel)
# How many full contexts of prompt text a request body may carry (a batch of prompts).
BODY_CONTEXTS = 16
T = TypeVar("T")


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
    # How `tool_choice: "auto"` finds tool calls in the output (server/tools.py; vLLM's
    # --tool-call-parser): "hermes", "llama3_json", or None (auto is then refused).
    tool_call_parser: str | None = None
    # How chat replies are split into reasoning and content (server/reasoning.py; vLLM's
    # --reasoning-parser): "deepseek_r1", "qwen3", or None (the reply is all content).
    reasoning_parser: str | None = None


class ServerState:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.draining = False  # set on SIGTERM: new requests get 503 while old ones finish
        self._unknown_logged: set[str] = set()
        self.max_model_len = engine.engine.max_model_len
        self.request_limits: RequestLimits = engine.engine.request_limits
        tokenizer = engine.engine.tokenizer
        self.reasoning = make_reasoning_parser(settings.reasoning_parser)
        # The reasoning tags' token ids (start, end), for the engine's constraint phase.
        self.reasoning_tags: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        if self.reasoning is not None and tokenizer is not None:
            self.reasoning_tags = reasoning_tag_ids(self.reasoning, tokenizer)
        self.lanes = TokenizerLanes(tokenizer) if tokenizer is not None else None
        bound, why = token_bound(tokenizer) if tokenizer is not None else (None, "no tokenizer")
        self.limits = PromptLimits(self.max_model_len, bound, text_prompts=tokenizer is not None)
        # Room for a batch of prompts (/v1/completions takes up to MAX_PROMPTS_PER_REQUEST):
        # BODY_CONTEXTS full contexts at the densest text the tokenizer allows.
        self.max_body_bytes = self.limits.body_limit(settings.max_body_bytes, BODY_CONTEXTS)
        # A chat message takes about 5 (an object, its keys and values), 5 more per content
        # part; and a template spends tokens on every message, so messages < max_model_len.
        # A batch's prompts are one string or list each.
        self.max_json_nodes = 8 * self.max_model_len + 256 + 2 * MAX_PROMPTS_PER_REQUEST
        self.body_limit_why = (
            "the server's limit"
            if self.max_body_bytes == settings.max_body_bytes
            else f"the most that {BODY_CONTEXTS} prompts filling this model's "
            f"{self.max_model_len}-token context can need"
        )
        if bound is None and tokenizer is not None:
            logger.info("text prompts are not length-checked before tokenizing: %s", why)
        logger.info(
            "request bodies up to %d bytes (%s)",
            self.max_body_bytes,
            why if bound is not None else "configured",
        )

    def reasoning_counter(self, start: str) -> Callable[[list[int]], int] | None:
        """How many of an output's tokens are its reasoning (markers included), for usage's
        reasoning_tokens: the engine's own phase tracker run over the ids (None: no parser,
        or no tokenizer to know the markers' ids)."""
        if self.reasoning is None or self.reasoning_tags is None:
            return None
        spec = self.reasoning_spec(start)
        if spec is None:  # the output begins as content
            return lambda ids: 0

        def count(ids: list[int]) -> int:
            phase = ReasoningPhase(spec)
            return sum(1 for t in ids if phase.take(t))

        return count

    def reasoning_spec(self, start: str) -> ReasoningSpec | None:
        """What tells the engine where a reply's reasoning ends (None: it begins as content)."""
        if self.reasoning_tags is None or start == CONTENT:
            return None
        begin, end = self.reasoning_tags
        return ReasoningSpec(end, begin if start == OPTIONAL else (), start)

    def check_supported(self, req: CompletionRequest | ChatCompletionRequest) -> None:
        """Refuses what asks for an unimplemented feature; logs each unknown field name once
        (a bounded number of them: a client sending random names cannot fill the log)."""
        for name in req.check_supported():
            if name in self._unknown_logged or len(self._unknown_logged) >= 64:
                continue
            self._unknown_logged.add(name)
            logger.warning(
                "request field %s is not part of the API this server knows; ignored "
                "(logged once per name)",
                shown(name),
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

    async def run_tokenizer(self, fn: Callable[[Any], T], param: str, size: int) -> T:
        """fn(tokenizer) on a tokenizer thread; `size` (characters) picks its lane."""
        if self.lanes is None:
            raise APIError(
                400,
                "this model has no tokenizer: send the prompt as a list of token ids",
                param=param,
            )
        try:
            return await self.lanes.run(fn, size)
        except APIError:
            raise
        except Exception as exc:  # template errors, odd text: the client's input, not our bug
            raise APIError(400, f"could not tokenize {param}: {_short(exc)}", param=param) from exc

    def check_request(self, ids: list[int], params: SamplingParams, param: str) -> None:
        """The engine's own admission check (engine/validation.py), answered as a 400 naming the
        field: the prompt's ids, then every id the sampling parameters carry. After the length
        check, so the prompt scan is over at most max_model_len ids."""
        try:
            check_prompt_ids(ids, self.request_limits, param)
            check_sampling_params(params, self.request_limits)
        except InvalidRequest as exc:
            raise APIError(400, str(exc), param=exc.param) from exc

    async def tokenize_prompts(
        self, prompts: list[str | list[int]], names: list[str], add_special_tokens: bool
    ) -> list[list[int]]:
        """Each prompt's ids. Every text is checked against the context first (no tokenizing),
        then all are tokenized in one job on the lane their total size picks."""
        texts = [(i, p) for i, p in enumerate(prompts) if isinstance(p, str)]
        for i, text in texts:
            self.limits.check_text(text, names[i])
        ids: list[list[int]] = [p if isinstance(p, list) else [] for p in prompts]
        if not texts:
            return ids

        def encode_all(tok: Any) -> list[list[int]]:
            out = []
            for i, text in texts:
                try:
                    out.append(list(tok.encode(text, add_special_tokens=add_special_tokens)))
                except Exception as exc:  # odd text: the client's input, not our bug
                    raise APIError(
                        400, f"could not tokenize {names[i]}: {_short(exc)}", param=names[i]
                    ) from exc
            return out

        size = sum(len(text) for _, text in texts)
        encoded = await self.run_tokenizer(encode_all, names[texts[0][0]], size)
        for (i, _), one in zip(texts, encoded, strict=True):
            ids[i] = one
        return ids

    async def echo_texts(self, prompts: list[str | list[int]], ids: list[list[int]]) -> list[str]:
        """The text `echo` puts before each completion: a text prompt as sent, an id prompt
        decoded (in one job on a tokenizer lane)."""
        if self.lanes is None:
            raise APIError(
                400, "echo needs the model's tokenizer to write the prompt's text", param="echo"
            )
        todo = [i for i, p in enumerate(prompts) if not isinstance(p, str)]

        def decode_all(tok: Any) -> list[str]:
            return [tok.decode(ids[i]) for i in todo]

        decoded = await self.run_tokenizer(decode_all, "prompt", sum(len(ids[i]) for i in todo))
        texts = [p if isinstance(p, str) else "" for p in prompts]
        for i, text in zip(todo, decoded, strict=True):
            texts[i] = text
        return texts

    def submit(self, requests: list[tuple[str, list[int], SamplingParams]]) -> list[RequestStream]:
        """All of a client request's prompts into the engine, or none of them."""
        try:
            return self.engine.submit_many(requests)
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


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


async def collect(request: Request, streams: list[RequestStream]) -> list[RequestOutput]:
    """The final outputs of non-streamed requests (the prompts of one client request), in
    order. If the client goes away, or one of them fails, the others are aborted."""

    async def finals() -> list[RequestOutput]:
        last: dict[int, RequestOutput] = {}
        async for i, out in group_outputs(streams):
            last[i] = out
        return [last[i] for i in range(len(streams))]

    work = asyncio.ensure_future(finals())
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
        for stream in streams:
            stream.close()  # no-op when it finished; otherwise frees its KV blocks now


class EventStream(StreamingResponse):
    """Server-sent events that abort their requests however the response ends."""

    def __init__(
        self, body: AsyncIterator[str], streams: list[RequestStream], request_id: str
    ) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._streams = streams
        self._body = body
        self._request_id = request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = False
        try:
            await super().__call__(scope, receive, send)
            # Returning early without an error: the client disconnected and starlette
            # cancelled the body (events() itself ends only once its requests are done).
            gone = not all(s.done for s in self._streams)
        except (ClientDisconnect, OSError):  # a send to a closed connection (ASGI 2.4)
            gone = True
        finally:
            # A disconnect cancels the body mid-iteration (or before it ever started, when a
            # generator's own `finally` would not run): abort here, where it always runs.
            for stream in self._streams:
                stream.close()
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
                self._request_id,
            )


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def events(
    streams: list[RequestStream],
    first: list[BaseModel],
    chunk: Callable[[int, RequestOutput], list[BaseModel]],
    usage_chunk: Callable[[UsageInfo], BaseModel] | None,
    reasoning_tokens: Callable[[list[int]], int] | None = None,
) -> AsyncIterator[str]:
    """A request's SSE: the opening chunks, then the chunks of each output of any of its prompts
    as it comes (one per choice it advances), usage (summed) once all are done, then [DONE]. An
    error ends it with an error chunk and aborts the prompts still running."""
    for piece in first:
        yield sse(piece)
    finals: list[RequestOutput] = []
    try:
        async for i, out in group_outputs(streams):
            for piece in chunk(i, out):
                yield sse(piece)
            if out.finished:
                finals.append(out)
    except _ENGINE_ERRORS as exc:
        for stream in streams:
            stream.close()
        yield sse(stream_error(exc).body())
    else:
        if usage_chunk is not None:
            yield sse(usage_chunk(usage_of(finals, reasoning_tokens)))
    yield "data: [DONE]\n\n"


def usage_of(
    outs: list[RequestOutput], reasoning_tokens: Callable[[list[int]], int] | None = None
) -> UsageInfo:
    """Usage summed over the prompts of a request: each prompt once, every sample's output
    (n > 1), as vLLM counts; with `reasoning_tokens` (a sample's token ids -> how many of them
    are its reasoning's), OpenAI's completion_tokens_details.reasoning_tokens too."""
    reasoning = None
    if reasoning_tokens is not None:
        reasoning = sum(reasoning_tokens(list(c.token_ids)) for o in outs for c in o.outputs)
    return UsageInfo.of(
        sum(len(o.prompt_token_ids) for o in outs),
        sum(len(c.token_ids) for o in outs for c in o.outputs),
        reasoning,
    )


def sample_deltas(out: RequestOutput, n: int) -> list[CompletionOutput]:
    """The news of each sample an output carries, as (delta) CompletionOutputs. n = 1: the one
    completion's delta (delta_text, delta_token_ids), finish_reason once finished. n > 1: a
    running output holds the deltas of the samples that advanced; the finished output holds
    every sample whole, all of it already sent: nothing."""
    if n == 1:
        o = out.outputs[0]
        return [
            dataclasses.replace(
                o,
                text=out.delta_text,
                token_ids=out.delta_token_ids,
                finish_reason=o.finish_reason if out.finished else None,
                stop_reason=o.stop_reason if out.finished else None,
                logprobs=None
                if o.logprobs is None
                else o.logprobs[len(o.logprobs) - len(out.delta_token_ids) :],
            )
        ]
    return [] if out.finished else out.outputs


def response_id(prefix: str, client_id: str | None) -> tuple[str, str]:
    """The id the client sees (vLLM's "<prefix>-<request_id>" when it sent one) and the base
    of the engine's ids (always unique: clients may repeat theirs)."""
    engine_id = new_id(prefix)
    return (engine_id if client_id is None else f"{prefix}-{client_id}"), engine_id


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

    def decode_token(token: int) -> str | None:
        """A prompt token's text, for the one logprobs entry that has none (the first)."""
        tok = engine.engine.tokenizer
        return None if tok is None else tok.decode([token])

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
        state.check_supported(req)
        prompts, batched = req.prompt_list()
        if len(prompts) > engine.max_waiting_requests:  # could never be queued at once
            raise APIError(
                400,
                f"prompt holds {len(prompts)} prompts; this server queues at most "
                f"{engine.max_waiting_requests} requests",
                param="prompt",
            )
        if len(prompts) * req.num_samples > MAX_PROMPTS_PER_REQUEST:
            raise APIError(
                400,
                f"{len(prompts)} prompts x n={req.num_samples} is "
                f"{len(prompts) * req.num_samples} choices; at most {MAX_PROMPTS_PER_REQUEST} "
                "are returned by one request",
                param="n",
            )
        # In a batch each prompt is checked like a single one, and named `prompt.<i>`; one bad
        # prompt refuses the whole request before any is submitted.
        names = [f"prompt.{i}" if batched else "prompt" for i in range(len(prompts))]
        all_ids = await state.tokenize_prompts(prompts, names, req.add_special_tokens)
        all_params = []
        for ids, name in zip(all_ids, names, strict=True):
            params = req.to_sampling_params(len(ids), state.max_model_len, name)
            state.check_request(ids, params, name)
            all_params.append(params)
        rid, engine_id = response_id("cmpl", req.request_id)
        created = int(time.time())
        engine_ids = [f"{engine_id}-{i}" for i in range(len(prompts))] if batched else [engine_id]
        streams = state.submit(list(zip(engine_ids, all_ids, all_params, strict=True)))

        top = req.logprobs
        n = req.num_samples
        choices_total = len(prompts) * n
        offsets = [0] * choices_total  # characters already sent, by choice (text_offset)
        echo = await state.echo_texts(prompts, all_ids) if req.echo else None
        echoed = [False] * choices_total  # a stream echoes the prompt in a choice's first chunk
        # Each prompt's prompt logprobs, once the engine hands them over (with the first token;
        # an n > 1 request's with its first output and again when it finishes).
        prompt_lps: list[PromptLogprobList | None] = [None] * len(prompts)

        def choice(i: int, o: CompletionOutput) -> CompletionChoice:
            """Choice i * n + o.index of prompt i (prompt * n + sample, as OpenAI and vLLM
            number them): a sample's whole completion, or its delta while streaming."""
            index = i * n + o.index
            text, tokens = o.text, list(o.token_ids)
            entries: list[SampleLogprob | None] = []
            if top is not None and o.logprobs is not None:
                entries = list(o.logprobs)
            if req.echo_only:  # the prompt alone (its one computed token is not shown)
                text, tokens, entries = "", [], []
            if echo is not None and not echoed[index]:
                echoed[index] = True
                text = echo[i] + text
                if top is not None:  # the prompt's tokens lead the logprobs (vLLM's rule)
                    prompt_lp = prompt_lps[i]
                    if prompt_lp is None:
                        raise APIError(
                            500, "the engine returned no prompt logprobs", "server_error"
                        )
                    tokens = [*all_ids[i], *tokens]
                    entries = [*prompt_lp, *entries]
            c = CompletionChoice(
                index=index, text=text, finish_reason=o.finish_reason, stop_reason=o.stop_reason
            )
            if top is not None and (o.logprobs is not None or entries):
                c.logprobs = completion_logprobs(
                    tokens,
                    entries,
                    top,
                    offsets[index],
                    req.return_tokens_as_token_ids,
                    decode_token,
                )
                offsets[index] += sum(
                    len((e[t].decoded_token if e is not None else decode_token(t)) or "")
                    for t, e in zip(tokens, entries, strict=True)
                )
            return c

        if req.stream:

            def chunk(i: int, out: RequestOutput) -> list[BaseModel]:
                if out.prompt_logprobs is not None:
                    prompt_lps[i] = out.prompt_logprobs
                return [
                    CompletionResponse(id=rid, created=created, model=model, choices=[choice(i, o)])
                    for o in sample_deltas(out, n)
                    # else held back (a partial UTF-8 char, a possible stop string)
                    if o.text
                    or o.finish_reason
                    or (top is not None and o.token_ids)
                    or (echo is not None and not echoed[i * n + o.index])
                ]

            def usage_chunk(usage: UsageInfo) -> BaseModel:
                if req.echo_only:
                    usage = UsageInfo.of(usage.prompt_tokens, 0)
                return CompletionResponse(
                    id=rid, created=created, model=model, choices=[], usage=usage
                )

            body = events(streams, [], chunk, usage_chunk if req.include_usage else None)
            return EventStream(body, streams, rid)
        outs = await collect(request, streams)
        choices = []
        for i, out in enumerate(outs):
            prompt_lps[i] = out.prompt_logprobs
            for o in out.outputs:
                c = choice(i, o)
                c.prompt_logprobs = prompt_logprobs_json(out.prompt_logprobs)
                choices.append(c)
        usage = usage_of(outs)
        if req.echo_only:
            usage = UsageInfo.of(usage.prompt_tokens, 0)
        resp = CompletionResponse(
            id=rid, created=created, model=model, choices=choices, usage=usage
        )
        return JSONResponse(resp.model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        state.check_open(request)
        req = await parse_body(request, ChatCompletionRequest, state)
        model = state.resolve_model(req.model)
        state.check_supported(req)
        tool_plan = plan_tools(req, settings.tool_call_parser)
        conversation = [m.template_dict() for m in req.messages]
        # vLLM's chat echo: the last message's content leads the reply when it is the reply's
        # role's (the assistant's: a message being continued).
        last = conversation[-1]
        echo_text = last["content"] if req.echo and last["role"] == "assistant" else ""
        add_generation_prompt = req.generation_prompt()
        template_kwargs = req.template_kwargs()
        tokenizer = engine.engine.tokenizer
        if tokenizer is not None and (
            clash := template_kwarg_conflicts(tokenizer, template_kwargs)
        ):
            raise APIError(
                400,
                f"chat_template_kwargs may not set {shown(clash[0])}: it is a parameter of the "
                "template call itself (use the request field of that name where there is one)",
                param=f"chat_template_kwargs.{clash[0]}",
            )

        reasoner = state.reasoning
        hide_reasoning = reasoner is not None and not req.include_reasoning

        def tokenize_chat(tok: Any) -> tuple[list[int], str]:
            text = render_chat(
                tok,
                conversation,
                add_generation_prompt,
                continue_final_message=req.continue_final_message,
                documents=req.documents,
                template_kwargs=template_kwargs,
                tools=tool_plan.tools if tool_plan is not None else None,
            )
            state.limits.check_text(text, "messages")
            # Where the reply begins relative to its reasoning: the prompt may have opened it.
            start = reasoner.initial(text) if reasoner is not None else CONTENT
            return list(tok.encode(text, add_special_tokens=req.add_special_tokens)), start

        size = sum(len(m["content"]) for m in conversation)
        size += sum(len(str(extra)) for extra in (req.documents, template_kwargs) if extra)
        ids, start = await state.run_tokenizer(tokenize_chat, "messages", size)
        params = req.to_sampling_params(len(ids), state.max_model_len)
        if tool_plan is not None and tool_plan.structured is not None:
            constrain_for_tools(params, tool_plan)
        if params.structured_outputs is not None:  # the constraint starts after the reasoning
            params.reasoning = state.reasoning_spec(start)
        state.check_request(ids, params, "messages")
        count_reasoning = state.reasoning_counter(start)
        rid, engine_id = response_id("chatcmpl", req.request_id)
        created = int(time.time())
        streams = state.submit([(engine_id, ids, params)])
        top = params.logprobs
        n = params.n

        def chat_lp(o: CompletionOutput) -> ChatLogprobs | None:
            # Hidden reasoning hides the logprobs too: their tokens would show it (vLLM's).
            if top is None or o.logprobs is None or hide_reasoning:
                return None
            return chat_logprobs(o.token_ids, o.logprobs, top, req.return_tokens_as_token_ids)

        if req.stream:

            def make(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> BaseModel:
                return ChatCompletionChunk(
                    id=rid, created=created, model=model, choices=choices, usage=usage
                )

            tool_streams: dict[int, ToolStream] = {}  # by choice index
            thoughts: dict[int, ReasoningStream] = {}  # by choice index

            def chunk(i: int, out: RequestOutput) -> list[BaseModel]:
                pieces = []
                for o in sample_deltas(out, n):
                    wants_lp = top is not None and bool(o.token_ids) and not hide_reasoning
                    text, calls, reason = o.text, [], o.finish_reason
                    thought = ""
                    if reasoner is not None:  # the reasoning first, the content after it
                        split = thoughts.setdefault(o.index, reasoner.stream(start))
                        thought, text = split.feed(o.text, final=reason is not None)
                        if hide_reasoning:
                            thought = ""
                    if tool_plan is not None and (reasoner is None or text or reason):
                        stream = tool_streams.setdefault(o.index, tool_plan.stream())
                        text, calls, reason = stream.feed(text, reason is not None, reason)
                    if not text and not thought and not calls and not reason and not wants_lp:
                        continue  # held back (a partial UTF-8 char, a possible stop string)
                    delta = DeltaMessage(
                        content=text or None,
                        reasoning=thought or None,
                        reasoning_content=thought or None,
                        tool_calls=calls or None,
                    )
                    c = ChatStreamChoice(index=o.index, delta=delta, finish_reason=reason)
                    c.logprobs = chat_lp(o)
                    pieces.append(make([c]))
                return pieces

            first = [
                make(
                    [
                        ChatStreamChoice(
                            index=k, delta=DeltaMessage(role="assistant", content=echo_text)
                        )
                    ]
                )
                for k in range(n)
            ]
            usage_chunk = (lambda u: make([], u)) if req.include_usage else None
            body = events(streams, first, chunk, usage_chunk, count_reasoning)
            return EventStream(body, streams, rid)
        outs = await collect(request, streams)

        def finish(o: CompletionOutput) -> tuple[str | None, str | None, list, str | None]:
            """A sample's reasoning, message content, tool calls and finish reason. The tool
            calls are parsed from the content after the reasoning."""
            thought, text = None, o.text
            if reasoner is not None:
                thought, text = reasoner.split(o.text, start)
                if hide_reasoning:
                    thought = None
            if text is None:  # all reasoning: nothing answered (cut short)
                return thought, echo_text or None, [], o.finish_reason
            if tool_plan is None:
                return thought, echo_text + text, [], o.finish_reason
            content, calls, reason = tool_plan.finish(text, o.finish_reason)
            return thought, (echo_text + content if content is not None else None), calls, reason

        finished = [(o, *finish(o)) for o in outs[0].outputs]
        resp = ChatCompletionResponse(
            id=rid,
            created=created,
            model=model,
            choices=[
                ChatChoice(
                    index=o.index,
                    message=AssistantMessage(
                        content=content,
                        tool_calls=tool_calls,
                        reasoning=thought,
                        reasoning_content=thought,
                    ),
                    logprobs=chat_lp(o),
                    finish_reason=finish_reason,
                    stop_reason=o.stop_reason,
                )
                for o, thought, content, tool_calls, finish_reason in finished
            ],
            usage=usage_of(outs, count_reasoning),
            prompt_logprobs=prompt_logprobs_json(outs[0].prompt_logprobs),
        )
        return JSONResponse(resp.model_dump())

    return app
