"""Start and watch the processes of a tensor/pipeline-parallel group (no model code here).

Two ways in:
- one machine (the default): the engine's process is rank 0; ranks 1.. are spawned processes
  (torch.multiprocessing, spawn). Each gets a pipe: it reports "ready" or its traceback through
  it, and the pipe's end-of-file tells it that the parent died (it also polls the parent's pid),
  so no worker outlives the engine.
- torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set, WORLD_SIZE > 1): every
  process of the job runs the same command; RANK 0 builds the engine, the others serve as
  workers (executor/worker.py `run_torchrun_worker`) until rank 0 shuts down. This is how a
  group spans machines.

Collectives run with a bounded timeout (GRAPHWISE_DISTRIBUTED_TIMEOUT_S, default 300 s); the
startup wait for the workers to load is GRAPHWISE_WORKER_START_TIMEOUT_S (default 1800 s).
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing.connection
import os
import time
from collections.abc import Callable
from typing import Any

import torch

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


def watch_parent(parent_pid: int, conn: Any = None, poll_s: float = 1.0) -> None:
    """Run in a daemon thread of a child process: exit it when the parent is gone (its pid
    changes, or the pipe `conn` from it, which it never writes to, reaches end-of-file)."""
    while True:
        try:
            if conn is None:
                time.sleep(poll_s)
            elif conn.poll(poll_s):
                conn.recv()  # raises at end-of-file
        except (EOFError, OSError):
            os._exit(1)
        if os.getppid() != parent_pid:
            os._exit(1)


def device_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + local_rank)
    return device


class LocalWorkers:
    """The spawned ranks 1..world-1 of a one-machine group, and a pipe to each."""

    def __init__(self, procs: dict[int, Any], conns: dict[int, Any]) -> None:
        self.procs = procs
        self.conns = conns
        self._errors: dict[int, str] = {}

    @classmethod
    def spawn(
        cls, target: Callable[..., None], world: int, kwargs_of: Callable[[int], dict[str, Any]]
    ) -> LocalWorkers:
        """Start ranks 1..world-1 as `target(**kwargs_of(rank), conn=pipe)`."""
        import torch.multiprocessing as mp

        mpctx = mp.get_context("spawn")
        procs: dict[int, Any] = {}
        conns: dict[int, Any] = {}
        for rank in range(1, world):
            parent_end, child_end = mpctx.Pipe(duplex=True)
            proc = mpctx.Process(
                target=target,
                kwargs={**kwargs_of(rank), "conn": child_end},
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
