"""Filling a step's structured-output token bitmask on the host, rows in parallel.

Each constrained row needs its matcher's allowed next tokens as int32 words (bit j of word i
allows token 32 i + j; xgrammar's layout). The fill is the host work that must fit inside the
GPU's forward of the same step (docs/structured-output.md, "When the mask is filled"), so it is
kept cheap and parallel:

- Rows are split into interleaved chunks, one per thread of a persistent pool; the calling
  thread fills chunks too, and any chunk no pool thread has started by the time it is free,
  so a pool thread that waits for a core never delays the fill beyond the serial time (on a
  saturated machine a hand-off can wait a whole scheduler tick, 4 ms). A chunk is one call to xgrammar's `BatchGrammarMatcher` with
  `max_threads=1`: one Python call per chunk, its loop in C++. xgrammar's calls go through
  tvm-ffi, which releases the GIL, so the chunks run at once. (xgrammar's own multi-threaded
  batch fill starts and joins new OS threads on every call: tens of microseconds each, and on
  a busy host they queue behind whatever else is runnable.)
- Few rows are filled in the calling thread alone: handing a chunk to a pool thread and
  waiting for it costs ~25-60 us on the 2-CPU development machine, about what 8 rows of
  typical JSON states cost to fill there (5-11 us a row; structured-fill-cpu.json).
- Nothing here runs a torch CPU op (`torch.full`, `fill_`, `any`): above 32k elements they
  run in torch's intra-op OpenMP pool, whose threads sleep between steps; with no core free,
  waking one takes whole scheduler ticks (on the 2-CPU development machine under load: a
  [64, 4752] `torch.full` after 0.5 ms of other work, 15.5 ms with 2 intra-op threads, 14 us
  with one; benchmarks/results/structured-fill-cpu.json). The buffer comes from
  `torch.empty` and is written through its numpy view.
- With `pin_memory` (the engine drives a CUDA device) the buffer is pinned, from torch's
  caching host allocator: the runner copies it to the device with one asynchronous copy, and
  the allocator recycles the block only after that copy has run.

A row gets every token (-1 words) when it has no live matcher (no constraint, not compiled, or
terminated: its token will be dropped) or when its matcher allows none (it cannot be sampled
from nothing). Every other row's words are exactly its matcher's `fill_next_token_bitmask`,
whatever the number of threads (tests/engine/test_mask_fill.py).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

MAX_DEFAULT_THREADS = 8  # the automatic size's cap (vLLM's fill pool: min(cpus // 2, 8))
MIN_ROWS_PER_THREAD = 8  # fewer live rows than this per thread: not worth a hand-off


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and `taskset` set;
    `os.cpu_count()` counts the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_fill_threads(cpus: int | None = None) -> int:
    """Half the available CPUs, at most 8, at least 1: the other half stays with the engine's
    own thread (scheduling, output processing, launching the GPU's work), torch's threads and
    the grammar compiler. 1 on a 2-CPU machine, 8 on the 16-core H200 host."""
    n = available_cpus() if cpus is None else cpus
    return max(1, min(MAX_DEFAULT_THREADS, n // 2))


class MaskFiller:
    """Fills [rows, words] int32 bitmasks from xgrammar matchers with `threads` threads (the
    caller's and `threads - 1` pool workers, started on the first fill that uses them)."""

    def __init__(self, words: int, threads: int | None = None, pin_memory: bool = False) -> None:
        if threads is not None and (
            not isinstance(threads, int) or isinstance(threads, bool) or threads < 1
        ):
            raise ValueError(f"mask fill threads must be a positive integer, got {threads!r}")
        self.words = words
        self.threads = threads or default_fill_threads()
        self.pin_memory = pin_memory
        self._pool: ThreadPoolExecutor | None = None
        self._batch: list[Any] = []  # one single-threaded BatchGrammarMatcher per chunk slot
        self._lock = threading.Lock()

    def num_chunks(self, live: int) -> int:
        """How many threads fill `live` rows (1: the caller alone)."""
        return max(1, min(self.threads, live // MIN_ROWS_PER_THREAD))

    def fill(self, matchers: list[Any | None]) -> torch.Tensor:
        """Row i: matcher i's allowed next tokens, or every token (see the module's doc)."""
        n = len(matchers)
        mask = torch.empty((n, self.words), dtype=torch.int32, pin_memory=self.pin_memory)
        arr = mask.numpy()  # shares the buffer: numpy writes wake no torch threads
        rows: list[int] = []
        live: list[Any] = []
        for i, m in enumerate(matchers):
            if m is None or m.is_terminated():
                arr[i] = -1
            else:
                rows.append(i)
                live.append(m)
        if not live:
            return mask
        k = self.num_chunks(len(live))
        batch = self._batch_matchers(k)
        if k == 1:
            batch[0].batch_fill_next_token_bitmask(live, mask, rows)
        else:
            # Interleaved chunks: neighbouring rows tend to be alike (same request kind, same
            # stage of their output), so each chunk gets a share of the expensive ones.
            chunks = [(live[j::k], rows[j::k]) for j in range(k)]
            work = _Chunks(chunks, mask)
            pool = self._get_pool()
            for slot in range(1, k):
                pool.submit(work.run, batch[slot])
            work.run(batch[0])  # the caller fills too, and takes what no pool thread started
            work.wait()
        empty = ~arr.any(axis=1)  # ~35 us at 64 rows x 152k ids; rows set to -1 are never empty
        if empty.any():
            arr[empty] = -1
        return mask

    def _batch_matchers(self, k: int) -> list[Any]:
        if len(self._batch) < k:
            import xgrammar  # installed: the matchers come from it (engine/structured.py)

            with self._lock:
                while len(self._batch) < k:
                    self._batch.append(xgrammar.BatchGrammarMatcher(max_threads=1))
        return self._batch

    def _get_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.threads - 1, thread_name_prefix="graphwise-maskfill"
                )
            return self._pool

    def shutdown(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None


class _Chunks:
    """One fill's chunks, claimed one at a time by whichever thread is free (the caller and
    the pool threads); `wait` returns once every chunk is filled, raising a chunk's error. A
    pool thread that starts after the caller has claimed everything finds nothing to do."""

    def __init__(self, chunks: list[tuple[list[Any], list[int]]], mask: torch.Tensor) -> None:
        self._chunks = chunks
        self._mask = mask
        self._next = 0
        self._left = len(chunks)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._error: BaseException | None = None

    def run(self, batch: Any) -> None:
        while True:
            with self._lock:
                j = self._next
                if j == len(self._chunks):
                    return
                self._next += 1
            matchers, rows = self._chunks[j]
            try:
                batch.batch_fill_next_token_bitmask(matchers, self._mask, rows)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller by wait()
                self._error = exc
            finally:
                with self._lock:
                    self._left -= 1
                    if self._left == 0:
                        self._done.set()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error
