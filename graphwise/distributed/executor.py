"""ParallelModelRunner: the model runner of one tensor/pipeline-parallel rank.

Rank 0 (the driver) lives in the engine's process and is what `LLMEngine.runner` is: the engine
calls `execute(batch)`, `allocate_kv_cache(n)`, `setup_cuda_graphs(...)` and `shutdown()` on it as
on a plain ModelRunner. Before each of those it broadcasts a short control message to the other
ranks (workers, `serve()`), so that every rank then makes the same calls on its own shard:

    ("step", (records, all_rows))   run the model on this batch
    ("allocate", num_blocks)        (re)allocate this rank's KV cache
    ("graphs", max_model_len)       capture the decode CUDA graphs
    ("shutdown", None)

A step record per sequence is (request id, computed tokens, new tokens, total tokens, the new
token ids, blocks kept from the previous step's table, the table's new blocks): block tables are
sent incrementally, so a decode step sends a few integers per sequence. Workers rebuild
Sequence-like views and run the very same `ModelRunner.prepare`, so every rank builds identical
inputs. Only the driver samples (it holds the sequences, their generators and parameters); with
TP, stage 0's ranks gather their vocabulary shards of the logits to it. With PP, hidden states
(and the residual) go stage to stage by point-to-point sends, and the last stage sends the rows
to be sampled back to stage 0, which holds the LM head: a synchronous pipeline, one batch in
flight (see docs/parallel.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from graphwise.config import EngineConfig
from graphwise.distributed import parallel_state
from graphwise.distributed.parallel_state import ParallelContext
from graphwise.engine.scheduler import ScheduledBatch
from graphwise.layers import ops
from graphwise.layers.attention import ForwardContext
from graphwise.models.model_config import ModelConfig
from graphwise.runner.model_runner import (
    ModelRunner,
    StepHandle,
    StepInputs,
    select_attention_backend,
)

if TYPE_CHECKING:
    from graphwise.distributed.launcher import LocalWorkers

logger = logging.getLogger(__name__)

# (request id, computed, new, num_tokens, known new token ids, kept blocks, new blocks,
#  pending_row: the row of the previous step's sampled tokens that is this step's last input, or
#  -1 when every input id is known; async scheduling)
StepRecord = tuple[str, int, int, int, list[int], int, list[int], int]


def local_model_config(mc: ModelConfig, ctx: ParallelContext) -> ModelConfig:
    """The attention shapes one rank sees: its query heads and KV heads (layer indices stay
    global, so a pipeline stage's caches are indexed like the full model's)."""
    kv_count = parallel_state.kv_head_part(mc.num_key_value_heads, ctx.tp_rank, ctx.tp_size)[1]
    return dataclasses.replace(
        mc,
        num_attention_heads=mc.num_attention_heads // ctx.tp_size,
        num_key_value_heads=mc.num_key_value_heads // kv_count,
    )


# ---- step messages ---------------------------------------------------------------------------
class StepEncoder:
    """Driver side: a batch as step records, sending each block table's new blocks only.

    Both sides remember the tables of the previous step's sequences (and only those); a table
    that still starts with what was sent keeps it, anything else (preemption, a new request)
    is sent whole."""

    def __init__(self) -> None:
        self._sent: dict[str, list[int]] = {}

    def encode(self, batch: ScheduledBatch) -> list[StepRecord]:
        sent: dict[str, list[int]] = {}
        records: list[StepRecord] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            c = seq.num_computed_tokens
            table = seq.block_table
            prev = self._sent.get(seq.request_id)
            keep = 0
            if prev is not None and len(prev) <= len(table) and table[: len(prev)] == prev:
                keep = len(prev)
            pending = seq.pending_row if c + n > len(seq.token_ids) else -1
            records.append(
                (
                    seq.request_id,
                    c,
                    n,
                    seq.num_tokens,
                    seq.token_ids[c : c + n],
                    keep,
                    table[keep:],
                    pending,
                )
            )
            sent[seq.request_id] = list(table)
        self._sent = sent
        return records


class _TokenWindow:
    """The only tokens of a sequence a worker knows: the step's new ones, at their offset."""

    __slots__ = ("start", "ids")

    def __init__(self, start: int, ids: list[int]) -> None:
        self.start, self.ids = start, ids

    def __getitem__(self, key: slice) -> list[int]:
        if (
            isinstance(key, slice)
            and key.step is None
            and key.start == self.start
            and key.stop == self.start + len(self.ids)
        ):
            return self.ids
        raise IndexError(f"a worker knows tokens [{self.start}, +{len(self.ids)}) only, not {key}")

    def __len__(self) -> int:  # the known length (a pending token is not among the ids)
        return self.start + len(self.ids)


class SequenceView:
    """What ModelRunner.prepare reads of a Sequence, rebuilt from a step record."""

    __slots__ = (
        "request_id",
        "num_computed_tokens",
        "num_tokens",
        "token_ids",
        "block_table",
        "num_placeholders",
        "pending_row",
    )

    def __init__(
        self, rid: str, c: int, num_tokens: int, ids: list[int], table: list[int], pending: int
    ) -> None:
        self.request_id = rid
        self.num_computed_tokens = c
        self.num_tokens = num_tokens
        self.token_ids = _TokenWindow(c, ids)
        self.block_table = table
        self.num_placeholders = 1 if pending >= 0 else 0
        self.pending_row = pending


class StepDecoder:
    """Worker side of StepEncoder."""

    def __init__(self) -> None:
        self._tables: dict[str, list[int]] = {}

    def decode(self, records: list[StepRecord]) -> ScheduledBatch:
        tables: dict[str, list[int]] = {}
        batch = ScheduledBatch()
        for rid, c, n, num_tokens, ids, keep, suffix, pending in records:
            table = self._tables[rid][:keep] + suffix if keep else list(suffix)
            tables[rid] = table
            view = SequenceView(rid, c, num_tokens, ids, table, pending)
            batch.seqs.append(view)  # type: ignore[arg-type]
            batch.num_new_tokens.append(n)
        self._tables = tables
        return batch


# ---- failure injection (tests) ---------------------------------------------------------------
FAIL_RANK_ENV = "GRAPHWISE_TEST_FAIL_RANK"
FAIL_MODE_ENV = "GRAPHWISE_TEST_FAIL_MODE"  # "raise" | "exit" | "hang" (at the first step) | "load"


def maybe_inject_failure(rank: int, phase: str) -> None:
    if os.environ.get(FAIL_RANK_ENV) != str(rank):
        return
    mode = os.environ.get(FAIL_MODE_ENV, "raise")
    if phase == "load" and mode == "load":
        raise RuntimeError(f"injected failure while loading rank {rank}")
    if phase != "step" or mode == "load":
        return
    if mode == "exit":
        os._exit(3)
    if mode == "hang":
        while True:
            time.sleep(3600)
    raise RuntimeError(f"injected failure at the first step of rank {rank}")


# ---- the runner ------------------------------------------------------------------------------
class _Cluster:
    """What the driver must release however it goes away (shutdown, failure, GC, exit)."""

    def __init__(self, workers: LocalWorkers | None) -> None:
        self.workers = workers
        self.closed = False
        self.failed = False
        # The driver's captured graphs. They hold NCCL work: destroying the process group while
        # they live hangs (pytorch#115388; seen here: a TP=2 run with graphs never exited).
        self.graphs: Any | None = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.failed and parallel_state.is_initialized():
            try:
                dist.broadcast_object_list(
                    [("shutdown", None)], src=0, group=parallel_state.control_group()
                )
            except Exception:  # a dead worker: close() below kills whatever is left
                logger.debug("shutdown broadcast failed", exc_info=True)
        if self.workers is not None:
            self.workers.close(grace_s=0.0 if self.failed else 10.0)
        release_graphs(self.graphs)
        self.graphs = None
        parallel_state.destroy()


def release_graphs(graphs: Any | None) -> None:
    """Drop captured CUDA graphs (and their NCCL work) before the process group goes."""
    if graphs is None:
        return
    graphs.release(set())
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class ParallelModelRunner(ModelRunner):
    def __init__(
        self,
        config: EngineConfig,
        model: nn.Module,
        model_config: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        ctx: ParallelContext,
        workers: LocalWorkers | None = None,
    ) -> None:
        super().__init__(config, model, local_model_config(model_config, ctx), device, dtype)
        self.full_model_config = model_config
        self.ctx = ctx
        self.is_driver = ctx.rank == 0
        self.layer_range = parallel_state.stage_layers(
            model_config.num_hidden_layers, ctx.pp_rank, ctx.pp_size
        )
        self._encoder = StepEncoder()
        self._cluster = _Cluster(workers)
        if self.is_driver:
            weakref.finalize(self, self._cluster.close)

    # ---- driver API (what LLMEngine calls) --------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._broadcast(("allocate", num_blocks))
        self._guard(self._allocate_local, num_blocks)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> StepHandle:
        # Async scheduling: rank 0 broadcasts the sampled tokens device to device (one small
        # collective, no host sync), so every rank holds them for the next step's pending inputs.
        self._broadcast(("step", (self._encoder.encode(batch), False)))
        handle = self._guard(super().launch, batch)
        if handle.sample_seqs:
            assert self._last_tokens is not None
            self._guard(dist.broadcast, self._last_tokens, src=0)
        return handle

    @torch.inference_mode()
    def prompt_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        self._broadcast(("step", (self._encoder.encode(batch), True)))
        return self._guard(self._run_step, batch, True)

    def setup_cuda_graphs(self, max_model_len: int) -> None:
        if self.device.type != "cuda" and self.config.use_cuda_graph == "on":
            raise ValueError("cuda_graph='on' needs a CUDA device; use 'off' or 'auto'")
        self._broadcast(("graphs", max_model_len))
        self._guard(self._capture_graphs, max_model_len)

    def shutdown(self) -> None:
        self._cluster.close()

    @property
    def alive(self) -> bool:
        return not self._cluster.closed

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV bytes one token takes on this rank: its KV heads, its stage's layers (memory
        planning should divide a GPU's budget by this, not by the whole model's)."""
        mc = self.model_config
        start, end = self.layer_range
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * (end - start) * mc.num_key_value_heads * mc.head_dim * elem

    # ---- every rank -------------------------------------------------------------------------
    def serve(self) -> None:
        """A worker's loop: follow rank 0's control messages until it says shutdown."""
        decoder = StepDecoder()
        group = parallel_state.control_group()
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=group)
            kind, payload = box[0]
            if kind == "shutdown":
                release_graphs(self.graph_runner)  # before the caller destroys the group
                self.graph_runner = None
                return
            if kind == "step":
                maybe_inject_failure(self.ctx.rank, "step")
                records, all_rows = payload
                self._run_step(decoder.decode(records), all_rows)
            elif kind == "allocate":
                self._allocate_local(payload)
            elif kind == "graphs":
                self._capture_graphs(payload)
            else:
                raise RuntimeError(f"unknown control message {kind!r}")

    @torch.inference_mode()
    def _run_step(self, batch: ScheduledBatch, all_rows: bool) -> torch.Tensor | None:
        """A worker's step (the driver's, for prompt_logits): the same collectives, in the same
        order, as the driver's ModelRunner.execute."""
        inputs = self.prepare(batch)
        if all_rows:
            inputs.logits_indices = torch.arange(
                inputs.input_ids.shape[0], dtype=torch.int64, device=self.device
            )
        elif not inputs.sample_seqs:
            self.forward(inputs)
            return None
        hidden = self.forward(inputs)
        logits = None
        if self.ctx.is_first_stage:
            logits = self.model.compute_logits(hidden[inputs.logits_indices])  # type: ignore[operator]
        if not all_rows and not self.is_driver:
            # Rank 0's sampled tokens, for the inputs of sequences whose next token is pending.
            tokens = torch.empty(len(inputs.sample_seqs), dtype=torch.int64, device=self.device)
            dist.broadcast(tokens, src=0)
            self._last_tokens = tokens
        return logits

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        if self.ctx.pp_size == 1:
            return super().forward(inputs)
        return self._pipeline_forward(inputs)

    def _pipeline_forward(self, inputs: StepInputs) -> torch.Tensor:
        """One synchronous pass through the pipeline. Stage 0 returns [T, H] hidden states of
        which the sampled rows (inputs.logits_indices) are filled; other stages return theirs."""
        ctx = self.ctx
        self.steps_eager += 1
        fctx = ForwardContext(inputs.meta, self.backend, self.kv_caches)
        T = inputs.input_ids.shape[0]
        H = self.model_config.hidden_size
        if ctx.is_first_stage:
            out = self.model(inputs.input_ids, inputs.positions, fctx)
        else:
            buf = torch.empty(2, T, H, dtype=self.dtype, device=self.device)
            dist.recv(buf, src=ctx.stage_rank(ctx.pp_rank - 1))
            out = self.model(
                inputs.input_ids, inputs.positions, fctx, intermediate=(buf[0], buf[1])
            )
        n = inputs.logits_indices.numel()
        if not ctx.is_last_stage:
            dist.send(torch.stack(out), dst=ctx.stage_rank(ctx.pp_rank + 1))
        elif n:
            dist.send(out[inputs.logits_indices].contiguous(), dst=ctx.stage_rank(0))
        if not ctx.is_first_stage:
            return out if ctx.is_last_stage else out[0]
        hidden = torch.empty(T, H, dtype=self.dtype, device=self.device)
        if n:
            rows = torch.empty(n, H, dtype=self.dtype, device=self.device)
            dist.recv(rows, src=ctx.stage_rank(ctx.pp_size - 1))
            hidden[inputs.logits_indices] = rows
        return hidden

    def _allocate_local(self, num_blocks: int) -> None:
        """This rank's KV cache: its KV heads, for its pipeline stage's layers only."""
        self.kv_caches = []  # drop a previous (profiling) cache before allocating the new one
        mc = self.model_config
        shape = (num_blocks + 1, self.block_size, mc.num_key_value_heads, mc.head_dim)
        start, end = self.layer_range
        none = torch.empty(0, dtype=self.dtype, device=self.device)

        def pair() -> tuple[torch.Tensor, torch.Tensor]:
            return (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )

        self.kv_caches = [
            pair() if start <= i < end else (none, none) for i in range(mc.num_hidden_layers)
        ]
        self.num_blocks = num_blocks
        self.backend = select_attention_backend(
            self.config, self.device, scratch_slot=num_blocks * self.block_size
        )
        ops.enable_triton(self.backend.name == "triton")
        if self.is_driver:
            logger.info(
                "KV cache per rank: %d blocks x %d tokens, %d KV heads x %d layers "
                "(%.1f MiB), attention backend: %s",
                num_blocks,
                self.block_size,
                mc.num_key_value_heads,
                end - start,
                2 * sum(k.numel() * k.element_size() for k, _ in self.kv_caches) / 2**20,
                self.backend.name,
            )

    def _capture_graphs(self, max_model_len: int) -> None:
        mode = self.config.use_cuda_graph
        if self.device.type != "cuda" or mode == "off":
            return
        if self.ctx.pp_size > 1:
            if self.is_driver:
                logger.info("pipeline parallelism: decode runs eagerly (no CUDA graphs)")
            return
        from graphwise.runner.cuda_graph import CudaGraphRunner

        graphs = CudaGraphRunner(self, self.config, max_model_len)
        graphs.capture_all()  # every rank captures the same buckets, all-reduces inside
        everyone: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(everyone, graphs.buckets, group=parallel_state.control_group())
        keep = set.intersection(*(set(b) for b in everyone))
        graphs.release(keep)  # a bucket one rank could not capture replays nowhere
        self.graph_runner = graphs if graphs.graphs else None
        if self.is_driver:
            self._cluster.graphs = self.graph_runner

    # ---- driver plumbing --------------------------------------------------------------------
    def _broadcast(self, message: tuple[str, Any]) -> None:
        if self._cluster.closed:
            raise RuntimeError(
                "the tensor/pipeline-parallel workers are gone (failed or shut down)"
            )
        self._guard(
            dist.broadcast_object_list, [message], src=0, group=parallel_state.control_group()
        )

    def _guard(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run `fn`; any failure while workers are in the same step is fatal for the group:
        collect what the workers reported, stop them all, and raise one clear error."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not self.is_driver:
                raise
            raise self._fail(exc) from exc

    def _fail(self, exc: Exception) -> RuntimeError:
        cluster = self._cluster
        reports: list[str] = []
        if cluster.workers is not None:
            reports = cluster.workers.collect_errors(wait_s=1.0)
        cluster.failed = True
        cluster.close()
        detail = "\n".join([f"rank 0: {type(exc).__name__}: {exc}", *reports])
        return RuntimeError(
            f"tensor/pipeline-parallel step failed (tp={self.ctx.tp_size}, "
            f"pp={self.ctx.pp_size}); the workers were stopped:\n{detail}"
        )
