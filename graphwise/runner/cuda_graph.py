"""CUDA-graph capture and replay of the decode step.

One graph per batch-size bucket, all sharing one memory pool and captured largest first (the
smaller graphs then fit inside the pool the largest one reserved). A step of n sequences replays
the smallest bucket >= n; the extra lanes are padding: token 0 at position 0, KV slot -1 (written
nowhere) and context length 0 (read nothing). Inputs are copied into static buffers, so the
replay path allocates nothing.

Buckets listed in `eager_buckets` (released by the auto policy, or whose capture failed) run
eagerly: a batch whose own bucket is one of them is not padded up into a larger graph.

A pipeline stage (opt-in: `GRAPHWISE_PP_CUDA_GRAPHS=1`, see runner/model_runner.py) captures its
own layers: a stage after the first also takes the previous stage's hidden states and residual
through static buffers, and a stage before the last returns its (hidden, residual). The sends
between stages stay outside the graphs.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from graphwise.config import EngineConfig
from graphwise.distributed import parallel_state

if TYPE_CHECKING:
    from graphwise.runner.inputs import StepInputs
    from graphwise.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)
# One side stream per device for every capture of every runner (the auto policy builds several
# runners): each new stream gets its own cuBLAS workspace, which lives as long as the process.
_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256 and every 16 beyond, always ending at max_bs."""
    sizes = [s for s in (1, 2, 4) if s < max_bs]
    s = 8
    while s < max_bs:
        sizes.append(s)
        s += 8 if s < 256 else 16
    sizes.append(max_bs)
    return sizes


@dataclass
class CaptureStats:
    buckets: list[int] = field(default_factory=list)
    seconds: float = 0.0
    pool_bytes: int = 0
    failed: dict[int, str] = field(default_factory=dict)


class CudaGraphRunner:
    def __init__(
        self,
        runner: ModelRunner,
        config: EngineConfig,
        max_model_len: int,
        buckets: list[int] | None = None,
        eager_buckets: Iterable[int] | None = None,
    ) -> None:
        self.runner = runner
        self.eager_buckets = sorted(set(eager_buckets or ()))
        self.max_bs = config.cuda_graph_max_rows
        self.buckets = sorted(buckets) if buckets else capture_sizes(self.max_bs)
        self.max_bs = self.buckets[-1]
        # Contexts longer than this replay eagerly (the block table width is baked into the graph).
        max_context = config.cuda_graph_max_context or max_model_len
        bs = runner.block_size
        self.max_blocks = -(-min(max_context, max_model_len) // bs)
        device = runner.device
        hidden = runner.model_config.hidden_size
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, device=device)
        # A pipeline stage after the first: the previous stage's (hidden, residual).
        self.intermediate: torch.Tensor | None = None
        if not runner.parallel.is_first_stage:
            self.intermediate = torch.zeros(
                2, self.max_bs, hidden, dtype=runner.dtype, device=device
            )
        backend = runner.backend
        backend.init_graph_buffers(self.max_bs, self.max_blocks, device)
        if hasattr(backend, "init_workspace"):
            mc = runner.model_config
            backend.init_workspace(
                self.buckets,
                mc.num_attention_heads,
                mc.num_key_value_heads,
                mc.head_dim,
                runner.block_size,
                device,
            )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # hidden states, or (hidden, residual) on a pipeline stage before the last
        self.outputs: dict[int, Any] = {}
        self.pool: object | None = None
        self._stream: torch.cuda.Stream | None = None
        self.stats = CaptureStats()
        self._hidden = hidden

    # ---- capture ----------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self, bs: int, warmup: int = 2) -> None:
        runner = self.runner
        meta = runner.backend.capture_metadata(bs)
        ids, pos = self.input_ids[:bs], self.positions[:bs]
        inter = (
            None
            if self.intermediate is None
            else (self.intermediate[0, :bs], self.intermediate[1, :bs])
        )
        if self._stream is None:  # one side stream for every capture (one cuBLAS workspace)
            if runner.device not in _CAPTURE_STREAMS:
                _CAPTURE_STREAMS[runner.device] = torch.cuda.Stream(runner.device)
            self._stream = _CAPTURE_STREAMS[runner.device]
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(runner.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # autotuning and lazy init happen outside the graph
                runner.run_model(ids, pos, meta, inter)
        torch.cuda.current_stream(runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = runner.run_model(ids, pos, meta, inter)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[bs] = graph
        self.outputs[bs] = out

    def try_capture(self, bs: int, warmup: int = 2) -> str | None:
        """Capture one bucket; None, or why it failed on this or another rank (then no rank
        keeps it: under tensor parallelism the ranks' replays must pair up)."""
        error = None
        try:
            self.capture(bs, warmup=warmup)
        except RuntimeError as exc:  # out of memory, or a failed capture: this bucket is eager
            error = f"capture failed: {(str(exc).splitlines() or [type(exc).__name__])[0]}"
            torch.cuda.synchronize(self.runner.device)
            torch.cuda.empty_cache()
        error = next((e for e in parallel_state.agree_all(error) if e is not None), None)
        if error is not None:
            self.release(set(self.graphs) - {bs})
            if self.runner.is_driver:
                logger.warning("CUDA graph capture for batch %d failed (%s): eager", bs, error)
        return error

    def capture_all(self) -> CaptureStats:
        device = self.runner.device
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # so that free_before - free_after counts only what capture keeps
        free_before, _ = torch.cuda.mem_get_info(device)
        start = time.perf_counter()
        for bs in reversed(self.buckets):
            error = self.try_capture(bs)
            if error is not None:
                self.stats.failed[bs] = error
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # warm-up leftovers are not graph memory
        free_after, _ = torch.cuda.mem_get_info(device)
        self.eager_buckets = sorted(set(self.eager_buckets) | set(self.stats.failed))
        self.buckets = sorted(self.graphs)
        self.stats.buckets = list(self.buckets)
        self.stats.seconds = time.perf_counter() - start
        self.stats.pool_bytes = max(0, free_before - free_after)
        if self.runner.is_driver:
            logger.info(
                "Captured %d CUDA graphs (batch %s..%s, context <= %d tokens) in %.2f s using "
                "%.1f MiB",
                len(self.buckets),
                self.buckets[0] if self.buckets else "-",
                self.buckets[-1] if self.buckets else "-",
                self.max_blocks * self.runner.block_size,
                self.stats.seconds,
                self.stats.pool_bytes / 2**20,
            )
        return self.stats

    def release(self, keep: set[int]) -> None:
        """Drop the graphs of buckets not in `keep` (their pool memory returns to the cache)."""
        for bs in list(self.graphs):
            if bs not in keep:
                del self.graphs[bs], self.outputs[bs]
                self.eager_buckets.append(bs)
        self.eager_buckets = sorted(set(self.eager_buckets))
        self.buckets = sorted(self.graphs)

    # ---- replay -----------------------------------------------------------------------
    def bucket_for(self, n: int) -> int | None:
        """The graph a batch of n replays: the smallest captured bucket >= n, unless an eager
        bucket lies in between (n's own bucket was judged slower as a graph, or failed)."""
        i = bisect.bisect_left(self.buckets, n)
        if i == len(self.buckets):
            return None
        bucket = self.buckets[i]
        if self.eager_buckets:
            j = bisect.bisect_left(self.eager_buckets, n)
            if j < len(self.eager_buckets) and self.eager_buckets[j] < bucket:
                return None
        return bucket

    def can_replay(self, inputs: StepInputs) -> bool:
        meta = inputs.meta
        return (
            meta.is_decode
            and self.bucket_for(meta.batch_size) is not None
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def replay(
        self, inputs: StepInputs, intermediate: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> Any:
        """The step's hidden states [n, H] (a view of the graph's output: valid until the next
        replay), or (hidden, residual) on a pipeline stage before the last; `intermediate`
        is the previous stage's (hidden, residual) on a stage after the first."""
        n = inputs.meta.batch_size
        bs = self.bucket_for(n)
        assert bs is not None
        self.input_ids[:n].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:n].copy_(inputs.positions, non_blocking=True)
        if bs > n:
            self.input_ids[n:bs].zero_()
            self.positions[n:bs].zero_()
        if self.intermediate is not None:
            if intermediate is None:
                raise ValueError("a pipeline stage after the first replays with intermediate")
            self.intermediate[0, :n].copy_(intermediate[0], non_blocking=True)
            self.intermediate[1, :n].copy_(intermediate[1], non_blocking=True)
            if bs > n:
                self.intermediate[:, n:bs].zero_()
        self.runner.backend.fill_replay_metadata(bs, inputs.meta)
        self.graphs[bs].replay()
        out = self.outputs[bs]
        if isinstance(out, tuple):
            return out[0][:n], out[1][:n]
        return out[:n]
