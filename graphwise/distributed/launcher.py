"""Start the ranks of a tensor/pipeline-parallel engine.

Two ways in:
- one machine (the default): the engine's process is rank 0; ranks 1.. are spawned processes
  (torch.multiprocessing, spawn). Each gets a pipe: it reports "ready" or its traceback through
  it, and the pipe's end-of-file tells it that the parent died (it also polls the parent's pid),
  so no worker outlives the engine.
- torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set, WORLD_SIZE > 1): every
  process of the job builds the engine; RANK 0 becomes the engine, the others serve as workers
  and exit when rank 0 shuts down. This is how a group spans machines.

Collectives run with a bounded timeout (GRAPHWISE_DISTRIBUTED_TIMEOUT_S, default 300 s); the
startup wait for the workers to load is GRAPHWISE_WORKER_START_TIMEOUT_S (default 1800 s).
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing.connection
import os
import sys
import time
from typing import Any

import torch

from graphwise.config import EngineConfig
from graphwise.distributed import parallel_state
from graphwise.distributed.parallel_state import ParallelContext
from graphwise.models.model_config import ModelConfig

logger = logging.getLogger(__name__)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def distributed_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("GRAPHWISE_DISTRIBUTED_TIMEOUT_S", 300)))


def start_timeout_s() -> float:
    return float(os.environ.get("GRAPHWISE_WORKER_START_TIMEOUT_S", 1800))


def torchrun_env() -> dict[str, int] | None:
    """RANK / WORLD_SIZE / LOCAL_RANK when this process was started by torchrun (or anything
    that sets its variables) for a group of more than one process."""
    if not all(v in os.environ for v in TORCHRUN_VARS):
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world <= 1:
        return None
    return {
        "rank": int(os.environ["RANK"]),
        "world_size": world,
        "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", world)),
    }


# ---- checks ----------------------------------------------------------------------------------
def check_parallel_config(mc: ModelConfig, tp: int, pp: int) -> None:
    """A clear ValueError when the model does not split this way (the vocabulary is padded)."""
    problems = []
    if mc.num_attention_heads % tp:
        problems.append(
            f"tensor_parallel_size={tp} does not divide the {mc.num_attention_heads} attention heads"
        )
    kv = mc.num_key_value_heads
    if kv % tp and tp % kv:
        problems.append(
            f"tensor_parallel_size={tp} must divide the {kv} KV heads or be a multiple of them"
        )
    has_dense = mc.num_experts == 0 or any(
        not mc.is_moe_layer(i) for i in range(mc.num_hidden_layers)
    )
    if has_dense and mc.intermediate_size % tp:
        problems.append(
            f"tensor_parallel_size={tp} does not divide intermediate_size={mc.intermediate_size}"
        )
    shared = mc.shared_expert_intermediate_size
    if mc.num_experts and shared % tp:
        problems.append(
            f"tensor_parallel_size={tp} does not divide shared_expert_intermediate_size={shared}"
        )
    if pp > mc.num_hidden_layers:
        problems.append(
            f"pipeline_parallel_size={pp} exceeds the model's {mc.num_hidden_layers} layers"
        )
    if problems:
        raise ValueError(f"{mc.architecture} cannot be split: " + "; ".join(problems))


def check_device_count(needed: int, device: torch.device, available: int | None = None) -> None:
    """On CUDA one GPU per rank: fail before starting anything when there are too few."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if available is None else available
    first = device.index or 0
    if first + needed > count:
        raise ValueError(
            f"{needed} ranks need {needed} GPUs (from cuda:{first}), but {count} are visible "
            "(tensor_parallel_size x pipeline_parallel_size x data_parallel_size)"
        )


def resolve_model_config(config: EngineConfig, source: Any) -> ModelConfig:
    d = dict(source.config)
    if config.num_layers is not None:
        d["num_hidden_layers"] = config.num_layers
    return ModelConfig.from_dict(d)


def device_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + local_rank)
    return device


def build_shard(
    config: EngineConfig, source: Any, ctx: ParallelContext, device: torch.device, dtype: Any
) -> tuple[torch.nn.Module, ModelConfig]:
    from graphwise.models.loader import build_model

    with parallel_state.building(ctx):
        return build_model(source, config, device, dtype)


# ---- launch ----------------------------------------------------------------------------------
def launch_parallel_runner(
    config: EngineConfig, source: Any, device: torch.device, dtype: torch.dtype
) -> Any:
    """Start every rank and return rank 0's ParallelModelRunner (in torchrun mode, on the other
    ranks: serve as a worker, then exit the process)."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    world = tp * pp
    check_parallel_config(resolve_model_config(config, source), tp, pp)
    env = torchrun_env()
    if env is not None:
        return _launch_torchrun(config, source, device, dtype, env)
    check_device_count(world, device)
    return _launch_local(config, source, device, dtype)


def _launch_local(
    config: EngineConfig, source: Any, device: torch.device, dtype: torch.dtype
) -> Any:
    import torch.distributed as dist

    from graphwise.distributed.executor import ParallelModelRunner

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
    workers = LocalWorkers.spawn(config, world, store.port, device, dtype, timeout)
    try:
        start = time.perf_counter()
        model, mc = build_shard(config, source, ctx, device, dtype)
        workers.wait_ready(start_timeout_s())
        parallel_state.initialize(ctx, device_backend(device), timeout, store=store, device=device)
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
    return ParallelModelRunner(config, model, mc, device, dtype, ctx, workers)


def _launch_torchrun(
    config: EngineConfig,
    source: Any,
    device: torch.device,
    dtype: torch.dtype,
    env: dict[str, int],
) -> Any:
    from graphwise.distributed.executor import ParallelModelRunner

    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    if env["world_size"] != tp * pp:
        raise ValueError(
            f"torchrun started {env['world_size']} processes, but tensor_parallel_size x "
            f"pipeline_parallel_size = {tp * pp}"
        )
    if device.type == "cuda":
        check_device_count(env["local_world_size"], torch.device("cuda", 0))
        device = torch.device("cuda", env["local_rank"])
        torch.cuda.set_device(device)
    ctx = ParallelContext.from_rank(env["rank"], tp, pp)
    parallel_state.initialize(ctx, device_backend(device), distributed_timeout(), device=device)
    model, mc = build_shard(config, source, ctx, device, dtype)
    runner = ParallelModelRunner(config, model, mc, device, dtype, ctx)
    if ctx.rank == 0:
        return runner
    logger.info("rank %d: serving as a worker of rank 0 at %s", ctx.rank, os.environ["MASTER_ADDR"])
    try:
        runner.serve()
    finally:
        parallel_state.destroy()
    sys.exit(0)


class LocalWorkers:
    """The spawned ranks 1..world-1 of a one-machine group, and a pipe to each."""

    def __init__(self, procs: dict[int, Any], conns: dict[int, Any]) -> None:
        self.procs = procs
        self.conns = conns
        self._errors: dict[int, str] = {}

    @classmethod
    def spawn(
        cls,
        config: EngineConfig,
        world: int,
        store_port: int,
        device: torch.device,
        dtype: torch.dtype,
        timeout: datetime.timedelta,
    ) -> LocalWorkers:
        import torch.multiprocessing as mp

        from graphwise.distributed.worker import worker_main

        mpctx = mp.get_context("spawn")
        procs: dict[int, Any] = {}
        conns: dict[int, Any] = {}
        threads = max(1, (os.cpu_count() or 1) // world) if device.type == "cpu" else 1
        for rank in range(1, world):
            parent_end, child_end = mpctx.Pipe(duplex=True)
            proc = mpctx.Process(
                target=worker_main,
                kwargs=dict(
                    rank=rank,
                    config=config,
                    store_port=store_port,
                    device=rank_device(device, rank),
                    dtype=dtype,
                    timeout_s=timeout.total_seconds(),
                    parent_pid=os.getpid(),
                    conn=child_end,
                    num_threads=threads,
                ),
                name=f"graphwise-rank{rank}",
                daemon=False,  # a DP replica's TP workers are grandchildren: not daemonic
            )
            proc.start()
            child_end.close()  # the child's copy is the only one left: EOF when it dies
            procs[rank], conns[rank] = proc, parent_end
        return cls(procs, conns)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def _read(self, rank: int) -> Any:
        """One message from a worker, or ("dead", exit code) when its pipe is closed."""
        try:
            return self.conns[rank].recv()
        except (EOFError, OSError):
            proc = self.procs[rank]
            proc.join(1.0)
            return ("dead", proc.exitcode)

    def wait_ready(self, timeout_s: float) -> None:
        pending = set(self.procs)
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"ranks {sorted(pending)} did not finish loading within {timeout_s:.0f} s"
                )
            ready = multiprocessing.connection.wait([self.conns[r] for r in pending], left)
            for rank in [r for r in pending if self.conns[r] in ready]:
                msg = self._read(rank)
                if msg[0] == "ready":
                    pending.discard(rank)
                elif msg[0] == "error":
                    raise RuntimeError(f"rank {rank} failed to start:\n{msg[2]}")
                else:
                    raise RuntimeError(f"rank {rank} died while starting (exit code {msg[1]})")

    def collect_errors(self, wait_s: float) -> list[str]:
        """What the workers reported after a failed step: tracebacks, deaths, exit codes."""
        deadline = time.monotonic() + wait_s
        reports: list[str] = []
        for rank, conn in self.conns.items():
            while True:
                left = max(0.0, deadline - time.monotonic())
                try:
                    if not conn.poll(left):
                        break
                except (EOFError, OSError):
                    break
                msg = self._read(rank)
                if msg[0] == "error":
                    reports.append(f"rank {rank} raised:\n{msg[2]}")
                elif msg[0] == "dead":
                    if not any(r.startswith(f"rank {rank} ") for r in reports):
                        reports.append(f"rank {rank} exited (exit code {msg[1]})")
                    break
        for rank, proc in self.procs.items():
            if any(r.startswith(f"rank {rank} ") for r in reports):
                continue
            if proc.is_alive():
                reports.append(f"rank {rank} is still running and did not answer (stuck?)")
            else:
                reports.append(f"rank {rank} exited (exit code {proc.exitcode})")
        return reports

    def close(self, grace_s: float = 10.0) -> None:
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs.values():
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        for conn in self.conns.values():
            conn.close()
