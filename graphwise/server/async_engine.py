"""The engine thread and its asyncio bridge.

An engine (`EngineClient`: one LLMEngine, or the data-parallel front) is not thread-safe, so one
thread owns it. That thread runs a loop: drain the inbox
(new requests, aborts, stop), run one `step()` while there is work, and block on the inbox when
there is none (no busy spinning). Each step's outputs go back to the event loop in one
`call_soon_threadsafe` call, which puts them on the per-request asyncio queues; one hand-off per
step rather than per request keeps cross-thread wake-ups down when many requests decode together.

The asyncio side only ever talks to the thread through the inbox, and reads what the thread
publishes (an immutable `EngineSnapshot`) for metrics and admission control.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from graphwise.engine.client import EngineClient
from graphwise.outputs import RequestOutput
from graphwise.sampling_params import SamplingParams
from graphwise.server.metrics import EngineSnapshot, ServerMetrics

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread is gone; nothing more can be served."""


class EngineStepError(RuntimeError):
    """A model step failed; the requests it held were aborted."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting already."""


class ShutdownError(RuntimeError):
    """The server stopped before the request finished."""


class Sink(Protocol):
    """Where the engine thread's items for one request go (on the event loop)."""

    def put_nowait(self, item: Any) -> None: ...


class _Tagged:
    """A request's sink in a group: its items go to the group's one queue, tagged with the
    request's index, so the group reads them in the order the engine produced them."""

    __slots__ = ("queue", "index")

    def __init__(self, queue: asyncio.Queue[Any], index: int) -> None:
        self.queue, self.index = queue, index

    def put_nowait(self, item: Any) -> None:
        self.queue.put_nowait((self.index, item))


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink: Sink


@dataclass
class _Abort:
    request_id: str


_STOP = object()


class RequestStream:
    """One request's outputs, in order. Iterate `outputs()` (or `group_outputs` for the
    requests of one `submit_many`), then always call `close()`."""

    def __init__(self, owner: AsyncEngine, request_id: str, n: int = 1) -> None:
        self.owner = owner
        self.request_id = request_id
        self.n = n  # samples: the finished-requests metric counts each (as vLLM does)
        self.arrival = time.monotonic()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.sink: Sink = self.queue
        self.done = False  # the engine holds nothing more for it (finished or failed)
        self._closed = False
        self._last_token_time: float | None = None

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        assert self.sink is self.queue, "a grouped request is read through group_outputs"
        while not self.done:
            yield self.accept(await self.queue.get())

    def accept(self, item: Any) -> RequestOutput:
        """The output an item of the engine thread's carries; raises the error it carries."""
        if isinstance(item, BaseException):
            self.done = True  # the engine thread already dropped it
            raise item
        out, when = item
        self._observe(out, when)
        if out.finished:
            self.done = True
        return out

    def _observe(self, out: RequestOutput, when: float) -> None:
        m = self.owner.metrics
        # n > 1: a running output holds the new tokens of each sample that advanced.
        if out.delta_token_ids or (not out.finished and any(o.token_ids for o in out.outputs)):
            if self._last_token_time is None:
                m.ttft.observe(when - self.arrival)
            else:
                m.itl.observe(when - self._last_token_time)
            self._last_token_time = when
        if out.finished:
            m.e2e.observe(when - self.arrival)
            for o in out.outputs:  # each of n samples, as vLLM counts its child requests
                m.count_finished(o.finish_reason or "abort")

    def close(self) -> None:
        """Idempotent. A request still in the engine (client gone, error) is aborted at once."""
        if self._closed:
            return
        self._closed = True
        if not self.done:
            self.done = True
            self.owner.abort(self.request_id)
            self.owner.metrics.count_finished("abort", self.n)


async def group_outputs(
    streams: list[RequestStream],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) of the requests of one `submit_many`, in the order the engine produced
    them, until all are done; the first error is raised."""
    if len(streams) == 1:
        async for out in streams[0].outputs():
            yield 0, out
        return
    shared = streams[0].queue  # _Tagged sinks put every stream's items here
    while not all(s.done for s in streams):
        i, item = await shared.get()
        stream = streams[i]
        if not stream.done:  # (nothing follows a finished or failed output; a guard)
            yield i, stream.accept(item)


class AsyncEngine:
    def __init__(
        self,
        engine: EngineClient,
        max_waiting_requests: int = 4096,
        model_name: str | None = None,
    ) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.error: str | None = None  # why the engine thread died, if it did
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="graphwise-engine", daemon=True)
        # Owned by the engine thread only.
        self._sinks: dict[str, Sink] = {}
        self._adds_drained = 0
        # Owned by the event loop only: adds put in the inbox (the thread counts those it took).
        self._adds_sent = 0
        # (engine numbers, adds drained), replaced whole so that readers see one consistent pair.
        self._published = (self._take_snapshot(), 0)  # safe: the thread has not started
        # Metrics are labelled with the name clients use (the first served name), as in vLLM.
        self.metrics = ServerMetrics(self.snapshot, model_name or engine.model_name)

    # ---- asyncio side -----------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Ask the thread to finish (failing whatever it still holds); True once it exited."""
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """The thread runs and the engine can still run steps (a tensor-parallel engine whose
        workers died is dead: /health says so and new requests get 503, not a 500 each)."""
        return self.error is None and self._thread.is_alive() and self.engine.alive

    def snapshot(self) -> EngineSnapshot:
        s, drained = self._published
        in_inbox = max(0, self._adds_sent - drained)  # sent but not yet taken by the thread
        stats = dataclasses.replace(s.stats, num_waiting=s.stats.num_waiting + in_inbox)
        return EngineSnapshot(stats, self.alive)

    def num_waiting(self) -> int:
        return self.snapshot().stats.num_waiting

    def submit(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> RequestStream:
        return self.submit_many([(request_id, prompt_token_ids, params)])[0]

    def submit_many(
        self, requests: list[tuple[str, list[int], SamplingParams]]
    ) -> list[RequestStream]:
        """Queue several requests (the prompts of one client request): all, or none when the
        queue has no room for all of them."""
        if not self.alive:
            raise EngineDeadError(self.error or "the engine is not running")
        waiting = self.num_waiting()
        if waiting + len(requests) > self.max_waiting_requests:
            if len(requests) == 1:
                raise QueueFullError(f"{waiting} requests are already waiting; retry later")
            raise QueueFullError(
                f"{waiting} requests are already waiting and the queue holds "
                f"{self.max_waiting_requests}: no room for {len(requests)} more; retry later"
            )
        streams = [RequestStream(self, rid, params.n) for rid, _, params in requests]
        if len(streams) > 1:  # one queue for the group, read by group_outputs
            for i, stream in enumerate(streams):
                stream.queue = streams[0].queue
                stream.sink = _Tagged(streams[0].queue, i)
        for stream, (request_id, prompt_token_ids, params) in zip(streams, requests, strict=True):
            self._adds_sent += 1
            self._inbox.put(_Add(request_id, prompt_token_ids, params, stream.sink))
        return streams

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    # ---- engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # whatever it was: say so, fail the requests, stay honest
            logger.exception("engine thread died")
            self.error = f"engine thread died: {type(exc).__name__}: {exc}"
            self._fail_all(EngineDeadError(self.error))
        finally:
            self._publish()

    def _serve(self) -> None:
        engine = self.engine
        while True:
            commands = []
            if not engine.has_unfinished_requests():
                commands.append(self._inbox.get())  # idle: sleep until something arrives
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for cmd in commands:
                if cmd is _STOP:
                    self._fail_all(ShutdownError("the server is shutting down"))
                    return
                self._handle(cmd)
            if engine.has_unfinished_requests():
                self._step()
            self._publish()

    def _handle(self, cmd: _Add | _Abort) -> None:
        if isinstance(cmd, _Abort):
            if self._sinks.pop(cmd.request_id, None) is not None:
                self.engine.abort_request(cmd.request_id)
            return
        self._adds_drained += 1
        try:
            self.engine.add_request(
                None, cmd.params, prompt_token_ids=cmd.prompt_token_ids, request_id=cmd.request_id
            )
        except ValueError as exc:  # the frontend validated; still, answer rather than crash
            self._deliver([(cmd.sink, exc)])
            return
        except Exception as exc:
            logger.exception("add_request failed for %s", cmd.request_id)
            self.metrics.count_finished("error")
            self._deliver([(cmd.sink, EngineStepError(f"{type(exc).__name__}: {exc}"))])
            return
        self._sinks[cmd.request_id] = cmd.sink

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            # The engine isolates what it can (a request that breaks a step fails alone, as an
            # "error" output below); what reaches here left its state unknown: fail every
            # request it holds, so that it starts clean, and keep serving new ones.
            logger.error(
                "engine step failed (%s: %s); aborting %d request(s)",
                type(exc).__name__,
                exc,
                len(self._sinks),
            )
            self._fail_all(EngineStepError(f"engine step failed: {type(exc).__name__}: {exc}"))
            return
        now = time.monotonic()
        items: list[tuple[Sink, Any]] = []
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if out.finished:
                del self._sinks[out.request_id]
            if out.error is not None:  # this request alone failed; the others run on
                self.metrics.count_finished("error")
                items.append((sink, EngineStepError(out.error)))
            else:
                items.append((sink, (out, now)))
        self._deliver(items)

    def _fail_all(self, exc: BaseException) -> None:
        items = []
        if self._sinks and not isinstance(exc, ShutdownError):
            self.metrics.count_finished("error", len(self._sinks))
        for request_id, sink in list(self._sinks.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # a broken engine must not stop the others from being told
                logger.exception("abort of %s failed", request_id)
            items.append((sink, exc))
        self._sinks.clear()
        self._deliver(items)

    def _deliver(self, items: list[tuple[Sink, Any]]) -> None:
        if not items or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _take_snapshot(self) -> EngineSnapshot:
        return EngineSnapshot(self.engine.get_stats())

    def _publish(self) -> None:
        try:
            self._published = (self._take_snapshot(), self._adds_drained)
        except Exception:  # metrics must never take the engine thread down
            logger.exception("could not read engine statistics")


def _put_all(items: list[tuple[Sink, Any]]) -> None:
    for sink, item in items:
        sink.put_nowait(item)
