"""A spawned rank's process: load its shard, join the group, follow rank 0, exit with it.

Never outlives the engine: a watcher thread exits the process when the pipe to the parent
reaches end-of-file (the parent died, even by SIGKILL) or the parent pid changes.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import traceback
from typing import Any

import torch

from graphwise.config import EngineConfig

PARENT_POLL_S = 1.0


def _watch_parent(conn: Any, parent_pid: int) -> None:
    while True:
        try:
            if conn.poll(PARENT_POLL_S):
                conn.recv()  # the parent never writes: this raises at end-of-file
        except (EOFError, OSError):
            os._exit(1)
        if os.getppid() != parent_pid:
            os._exit(1)


def worker_main(
    rank: int,
    config: EngineConfig,
    store_port: int,
    device: torch.device,
    dtype: torch.dtype,
    timeout_s: float,
    parent_pid: int,
    conn: Any,
    num_threads: int,
) -> None:
    threading.Thread(
        target=_watch_parent, args=(conn, parent_pid), name="parent-watch", daemon=True
    ).start()
    try:
        _run(rank, config, store_port, device, dtype, timeout_s, conn, num_threads)
    except BaseException:
        try:
            conn.send(("error", rank, traceback.format_exc()))
        except Exception:
            pass
        sys.exit(1)


def _run(
    rank: int,
    config: EngineConfig,
    store_port: int,
    device: torch.device,
    dtype: torch.dtype,
    timeout_s: float,
    conn: Any,
    num_threads: int,
) -> None:
    import torch.distributed as dist

    from graphwise.distributed import parallel_state
    from graphwise.distributed.executor import ParallelModelRunner, maybe_inject_failure
    from graphwise.distributed.launcher import build_shard, device_backend
    from graphwise.distributed.parallel_state import ParallelContext
    from graphwise.models.loader import resolve_source

    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(num_threads)
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    ctx = ParallelContext.from_rank(rank, tp, pp)
    timeout = datetime.timedelta(seconds=timeout_s)
    maybe_inject_failure(rank, "load")
    model, mc = build_shard(config, resolve_source(config), ctx, device, dtype)
    conn.send(("ready",))
    store = dist.TCPStore("127.0.0.1", store_port, ctx.world_size, is_master=False, timeout=timeout)
    parallel_state.initialize(ctx, device_backend(device), timeout, store=store, device=device)
    runner = ParallelModelRunner(config, model, mc, device, dtype, ctx)
    try:
        runner.serve()
    finally:
        parallel_state.destroy()
