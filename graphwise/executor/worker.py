"""Ranks 1.. of a tensor/pipeline-parallel group: load a shard, then follow rank 0.

A worker runs the same `ModelRunner` as rank 0 on its own shard and does what rank 0's executor
broadcasts over the control group: `(method, args, want_result)` calls a runner method (a step,
an allocation, a capture, a profile...), `("shutdown", ...)` ends the loop. Results that are
wanted go back to rank 0 by a gather on the sync group.

A thread receives the messages and queues them; the main thread makes the calls in order. So
rank 0's broadcast of its next step returns at once even while this rank still computes the
previous one (a gloo broadcast waits for every receiver): with pipeline micro-batches stage 0
goes on with batch B while stage 1 computes batch A.

A spawned worker never outlives the engine: a watcher thread exits the process when the pipe to
the parent reaches end-of-file (the parent died, even by SIGKILL) or the parent pid changes.

Tests inject failures through a hook: `GRAPHWISE_TEST_WORKER_HOOK=module:function` is called as
`function(rank, phase)` at "load" and before each "step" (tests/distributed/faults.py).
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import queue
import sys
import threading
import traceback
from typing import Any

import torch
import torch.distributed as dist

from graphwise.config import EngineConfig
from graphwise.distributed import parallel_state
from graphwise.distributed.launcher import device_backend, torchrun_env, watch_parent
from graphwise.distributed.parallel_state import ParallelContext
from graphwise.models.loader import ModelSource, build_model, resolve_source
from graphwise.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)
HOOK_ENV = "GRAPHWISE_TEST_WORKER_HOOK"
SHUTDOWN = "shutdown"


def call_hook(rank: int, phase: str) -> None:
    spec = os.environ.get(HOOK_ENV)
    if spec:
        module, _, name = spec.partition(":")
        getattr(importlib.import_module(module), name)(rank, phase)


def build_shard(
    config: EngineConfig,
    source: ModelSource,
    ctx: ParallelContext,
    device: torch.device,
    dtype: torch.dtype,
    vocab_limit: int | None,
) -> ModelRunner:
    """This rank's shard of the model, in a runner."""
    with parallel_state.building(ctx):
        model, model_config = build_model(source, config, device, dtype)
    return ModelRunner(config, model, model_config, device, dtype, ctx, vocab_limit)


def serve(runner: ModelRunner) -> None:
    """A worker's loop: do what rank 0 broadcasts, in order, until it says shutdown."""
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    threading.Thread(
        target=_receive, args=(parallel_state.control_group(), inbox), name="control", daemon=True
    ).start()
    results = parallel_state.sync_group()
    rank = runner.parallel.rank
    while True:
        message = inbox.get()
        if isinstance(message, BaseException):
            raise RuntimeError("the control group failed") from message
        method, args, want_result = message
        if method == SHUTDOWN:
            runner.release_graphs()  # before the caller destroys the group
            return
        if method == "execute_model":
            call_hook(rank, "step")
        result = getattr(runner, method)(*args)
        if want_result:
            dist.gather_object(result, None, dst=0, group=results)


def _receive(group: Any, inbox: queue.SimpleQueue[Any]) -> None:
    """Queue rank 0's messages as they come (a thread: see the module's docstring)."""
    while True:
        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=group)
        except BaseException as exc:  # rank 0 is gone or the group was destroyed
            inbox.put(exc)
            return
        inbox.put(box[0])
        if box[0][0] == SHUTDOWN:
            return


# ---- a spawned worker process ------------------------------------------------------------
def worker_main(
    rank: int,
    config: EngineConfig,
    store_port: int,
    device: torch.device,
    dtype: torch.dtype,
    vocab_limit: int | None,
    timeout_s: float,
    parent_pid: int,
    conn: Any,
    num_threads: int,
) -> None:
    """The entry point of a spawned rank (torch.multiprocessing, spawn)."""
    threading.Thread(
        target=watch_parent, args=(parent_pid, conn), name="parent-watch", daemon=True
    ).start()
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(num_threads)
        ctx = ParallelContext.from_rank(
            rank, config.tensor_parallel_size, config.pipeline_parallel_size
        )
        timeout = datetime.timedelta(seconds=timeout_s)
        call_hook(rank, "load")
        runner = build_shard(config, resolve_source(config), ctx, device, dtype, vocab_limit)
        conn.send(("ready",))
        store = dist.TCPStore(
            "127.0.0.1", store_port, ctx.world_size, is_master=False, timeout=timeout
        )
        parallel_state.initialize(ctx, device_backend(device), timeout, store=store, device=device)
        try:
            serve(runner)
        finally:
            parallel_state.destroy()
    except BaseException:
        try:
            conn.send(("error", rank, traceback.format_exc()))
        except Exception:
            pass
        sys.exit(1)


# ---- a torchrun rank ---------------------------------------------------------------------
def is_torchrun_worker() -> bool:
    """This process is a rank > 0 of a torchrun job (rank 0 runs the engine)."""
    env = torchrun_env()
    return env is not None and env["rank"] != 0


def run_torchrun_worker(config: EngineConfig) -> None:
    """Serve as rank > 0 of a torchrun job until rank 0 shuts the group down. The API layers
    (`LLM`, `graphwise serve`) call this on those ranks in place of building an engine."""
    from graphwise.executor.multiproc import join_torchrun_group

    runner = join_torchrun_group(config)
    logger.info("rank %d: serving as a worker of rank 0", runner.parallel.rank)
    try:
        serve(runner)
    finally:
        parallel_state.destroy()
