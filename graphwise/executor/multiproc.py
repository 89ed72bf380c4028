"""MultiProcExecutor: a tensor/pipeline-parallel group behind the executor interface.

This process is rank 0 (the driver): its own `ModelRunner` holds rank 0's shard. Before each
call it broadcasts `(method, args, want_result)` over the control group (gloo), so that every
worker (executor/worker.py) makes the same call on its shard; the runners' collectives then pair
up. Steps are `SchedulerOutput`s, pickled as they are: every rank builds identical inputs.

With pipeline micro-batches (`EngineConfig.num_pipeline_batches` > 1) a step is two calls:
`execute_model` launches it (each stage computes its layers and passes the hidden states on;
stage 0 returns at once) and the handle's `result()` broadcasts `finish_step`, where stage 0
receives the last stage's rows, computes the logits and samples. Between the two, rank 0
launches the next batch, which stage 0 computes while the later stages compute this one.

Ranks come from one of two places (distributed/launcher.py): spawned here on one machine, or
joined through torchrun's variables (then every process of the job is started by torchrun, rank 0
builds the engine and the others call `run_torchrun_worker`).

Any failure while the ranks are in the same call is fatal for the group: the executor collects
what the workers reported, stops them all, and raises one clear error; later calls say the
workers are gone.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from typing import Any

import torch
import torch.distributed as dist

from graphwise.config import EngineConfig
from graphwise.core.device import resolve_device, resolve_dtype
from graphwise.core.step import GrammarBitmask, SchedulerOutput
from graphwise.distributed import parallel_state
from graphwise.distributed.launcher import (
    LocalWorkers,
    check_device_count,
    device_backend,
    distributed_timeout,
    rank_device,
    start_timeout_s,
    torchrun_env,
)
from graphwise.distributed.parallel_state import ParallelContext
from graphwise.executor.base import Executor
from graphwise.executor.worker import SHUTDOWN, build_shard, worker_main
from graphwise.models.loader import ModelSource, model_config_of, resolve_source
from graphwise.models.model_config import check_parallel_config
from graphwise.runner.model_runner import ModelRunner
from graphwise.runner.step_handle import FinishOnResult, StepHandle

logger = logging.getLogger(__name__)


class _Cluster:
    """What the driver must release however it goes away (shutdown, failure, GC, exit)."""

    def __init__(self, driver: ModelRunner, workers: LocalWorkers | None) -> None:
        self.driver = driver
        self.workers = workers
        self.closed = False
        self.failed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.failed and parallel_state.is_initialized():
            try:
                dist.broadcast_object_list(
                    [(SHUTDOWN, (), False)], src=0, group=parallel_state.control_group()
                )
            except Exception:  # a dead worker: close() below kills whatever is left
                logger.debug("shutdown broadcast failed", exc_info=True)
        if self.workers is not None:
            self.workers.close(grace_s=0.0 if self.failed else 10.0)
        # Captured graphs hold NCCL work: destroying the process group while they live hangs
        # (pytorch#115388; seen here: a TP=2 run with graphs never exited).
        self.driver.release_graphs()
        parallel_state.destroy()


class MultiProcExecutor(Executor):
    def __init__(self, driver: ModelRunner, workers: LocalWorkers | None) -> None:
        self.driver = driver
        self.world_size = driver.parallel.world_size
        self._cluster = _Cluster(driver, workers)
        weakref.finalize(self, self._cluster.close)

    @classmethod
    def launch(
        cls,
        config: EngineConfig,
        source: ModelSource,
        device: torch.device,
        dtype: torch.dtype,
        vocab_limit: int | None,
    ) -> MultiProcExecutor:
        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        check_parallel_config(model_config_of(source, config), tp, pp)
        env = torchrun_env()
        if env is not None:
            if env["rank"] != 0:
                raise RuntimeError(
                    "rank > 0 of a torchrun job builds no engine: call "
                    "graphwise.executor.worker.run_torchrun_worker(config) there"
                )
            return cls(join_torchrun_group(config, vocab_limit), None)
        check_device_count(tp * pp, device)
        return cls._spawn(config, source, device, dtype, vocab_limit)

    @classmethod
    def _spawn(
        cls,
        config: EngineConfig,
        source: ModelSource,
        device: torch.device,
        dtype: torch.dtype,
        vocab_limit: int | None,
    ) -> MultiProcExecutor:
        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        world = tp * pp
        ctx = ParallelContext.from_rank(0, tp, pp)
        timeout = distributed_timeout()
        if parallel_state.is_initialized() or dist.is_initialized():
            raise RuntimeError(
                "this process already runs a tensor/pipeline-parallel engine: shut it down first"
            )
        device = rank_device(device, 0)
        store = dist.TCPStore(
            "127.0.0.1", 0, world, is_master=True, timeout=timeout, wait_for_workers=False
        )
        threads = max(1, (os.cpu_count() or 1) // world) if device.type == "cpu" else 1
        workers = LocalWorkers.spawn(
            worker_main,
            world,
            lambda rank: dict(
                rank=rank,
                config=config,
                store_port=store.port,
                device=rank_device(device, rank),
                dtype=dtype,
                vocab_limit=vocab_limit,
                timeout_s=timeout.total_seconds(),
                parent_pid=os.getpid(),
                num_threads=threads,
            ),
        )
        try:
            start = time.perf_counter()
            runner = build_shard(config, source, ctx, device, dtype, vocab_limit)
            workers.wait_ready(start_timeout_s())
            parallel_state.initialize(
                ctx, device_backend(device), timeout, store=store, device=device
            )
            logger.info(
                "Parallel engine: tp=%d pp=%d, %d processes on %s, ready in %.1f s",
                tp,
                pp,
                world,
                device.type,
                time.perf_counter() - start,
            )
        except BaseException:
            workers.close(grace_s=0.0)
            parallel_state.destroy()
            raise
        return cls(runner, workers)

    # ---- the executor interface -------------------------------------------------------------
    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        self._broadcast((method, args, True))
        result = self._guard(getattr(self.driver, method), *args)
        everyone: list[Any] = [None] * self.world_size
        self._guard(dist.gather_object, result, everyone, dst=0, group=parallel_state.sync_group())
        return everyone

    def execute_model(self, step: SchedulerOutput) -> StepHandle:
        self._broadcast(("execute_model", (step,), False))
        handle = self._guard(self.driver.execute_model, step)
        if self.driver.num_micro_batches > 1:
            step_id = step.step_id
            return FinishOnResult(lambda: self.finish_step(step_id))
        return handle

    def finish_step(self, step_id: int) -> StepHandle:
        """Sample a launched micro-batch (every rank joins; stage 0 does the work)."""
        self._broadcast(("finish_step", (step_id,), False))
        return self._guard(self.driver.finish_step, step_id)

    def sample_deferred(self, grammar: GrammarBitmask) -> StepHandle:
        self._broadcast(("sample_deferred", (grammar,), False))
        return self._guard(self.driver.sample_deferred, grammar)

    def shutdown(self) -> None:
        self._cluster.close()

    @property
    def alive(self) -> bool:
        return not self._cluster.closed

    @property
    def worker_pids(self) -> list[int]:
        workers = self._cluster.workers
        return workers.pids if workers is not None else []

    # ---- plumbing ---------------------------------------------------------------------------
    def _broadcast(self, message: tuple[str, tuple[Any, ...], bool]) -> None:
        if self._cluster.closed:
            raise RuntimeError(
                "the tensor/pipeline-parallel workers are gone (failed or shut down)"
            )
        self._guard(
            dist.broadcast_object_list, [message], src=0, group=parallel_state.control_group()
        )

    def _guard(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run `fn`; any failure while workers are in the same call is fatal for the group."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise self._fail(exc) from exc

    def _fail(self, exc: Exception) -> RuntimeError:
        cluster = self._cluster
        reports: list[str] = []
        if cluster.workers is not None:
            reports = cluster.workers.collect_errors(wait_s=1.0)
        cluster.failed = True
        cluster.close()
        ctx = self.driver.parallel
        detail = "\n".join([f"rank 0: {type(exc).__name__}: {exc}", *reports])
        return RuntimeError(
            f"tensor/pipeline-parallel step failed (tp={ctx.tp_size}, pp={ctx.pp_size}); "
            f"the workers were stopped:\n{detail}"
        )


def join_torchrun_group(config: EngineConfig, vocab_limit: int | None = None) -> ModelRunner:
    """This torchrun process's rank: its device, its place in the group, its shard."""
    env = torchrun_env()
    assert env is not None
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    if env["world_size"] != tp * pp:
        raise ValueError(
            f"torchrun started {env['world_size']} processes, but tensor_parallel_size x "
            f"pipeline_parallel_size = {tp * pp}"
        )
    source = resolve_source(config)
    device = resolve_device(config.device)
    if device.type == "cuda":
        check_device_count(env["local_world_size"], torch.device("cuda", 0))
        device = torch.device("cuda", env["local_rank"])
        torch.cuda.set_device(device)
    dtype = resolve_dtype(config.dtype, device, model_config_of(source, config).torch_dtype)
    ctx = ParallelContext.from_rank(env["rank"], tp, pp)
    parallel_state.initialize(ctx, device_backend(device), distributed_timeout(), device=device)
    return build_shard(config, source, ctx, device, dtype, vocab_limit)
