"""Named spans around the engine's phases, for profilers (NVTX) and tests.

The engine and the runner call `push(name)` / `pop()` around each phase of a step (step >
schedule, launch > prepare / forward / logits / sample, resolve). By default nothing listens;
`graphwise explain --nvtx` installs a tracer that opens NVTX ranges (insight/emulate.py).
"""

from __future__ import annotations

from typing import Protocol


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
