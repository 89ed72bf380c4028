"""Failure injection for the multi-process tests, called in every spawned worker through the
hook graphwise offers for this (GRAPHWISE_TEST_WORKER_HOOK, executor/worker.py).

GRAPHWISE_TEST_FAIL_RANK picks the rank; GRAPHWISE_TEST_FAIL_MODE what it does: "raise" or
"exit" or "hang" at its first step, or "load" (raise while loading its shard).
"""

from __future__ import annotations

import os
import time


def inject(rank: int, phase: str) -> None:
    if os.environ.get("GRAPHWISE_TEST_FAIL_RANK") != str(rank):
        return
    mode = os.environ.get("GRAPHWISE_TEST_FAIL_MODE", "raise")
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
