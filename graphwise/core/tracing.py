"""What the engine tells observers about its steps: named spans and a timing record per call.

The engine and the runner call `push(name)` / `pop()` around each phase of a step (step >
schedule, launch > prepare / forward / logits / sample, resolve). By default nothing listens;
`graphwise explain --nvtx` installs a tracer that opens NVTX ranges (insight/emulate.py).
A `StepSink` given as `engine.step_log` receives one `StepRecord` per `step()` call
(insight/step_log.py's `StepLog` keeps and summarizes them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class StepRecord:
    seqs: int  # sequences in the step launched by this call (0: nothing launched)
    tokens: int
    prefill_tokens: int
    context_tokens: int  # sum of the launched sequences' lengths after the step (KV read)
    schedule_s: float
    launch_s: float  # inputs, forward and sampling enqueued (eager: the whole forward's launches)
    wait_s: float  # blocked on the GPU for the resolved step's tokens
    process_s: float  # detokenize, stop checks, outputs
    total_s: float


class StepSink(Protocol):
    def add(self, record: StepRecord) -> None: ...


class Tracer(Protocol):
    def push(self, name: str) -> None: ...

    def pop(self) -> None: ...


class NullTracer:
    """Listens to nothing (the default: two no-op calls per phase)."""

    def push(self, name: str) -> None:
        pass

    def pop(self) -> None:
        pass


NULL_TRACER = NullTracer()
