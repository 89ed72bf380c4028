"""The CUDA-graph decision, as pure logic: which buckets to time, and what the timings decide.

`run_policy` measures the initial probes (the smallest and largest bucket and the powers of two
between), then bisects between neighbouring buckets that disagree, and decides every candidate
from what was measured (interpolating the rest). The measuring itself is passed in, so this runs
and is unit-tested without a GPU (runner/graph_policy.py drives it on one).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BucketTiming:
    """What was measured for one bucket; `error` set when its capture or timing failed."""

    batch_size: int
    eager_ms: float | None = None
    graph_ms: float | None = None
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None and _positive(self.eager_ms) and _positive(self.graph_ms)


@dataclass(frozen=True)
class BucketDecision:
    batch_size: int
    keep: bool
    eager_ms: float | None
    graph_ms: float | None
    speedup: float | None  # eager_ms / graph_ms
    source: str  # "measured" | "interpolated" | "extrapolated" | "failed" | "unmeasured"
    reason: str


def slowest_rank(timings: Sequence[BucketTiming]) -> BucketTiming:
    """One bucket's timing for a group of ranks, from each rank's own: the largest eager and
    the largest graph time (a tensor-parallel step waits for its slowest rank at every
    all-reduce; a pipeline runs at the pace of its slowest stage), or the first rank's error
    when any failed. Every rank computes it from the same gathered list, so every rank takes
    the same decision."""
    if not timings:
        raise ValueError("no timing to combine")
    bs = timings[0].batch_size
    if any(t.batch_size != bs for t in timings):
        raise ValueError(f"ranks timed different buckets: {[t.batch_size for t in timings]}")
    for rank, t in enumerate(timings):
        if t.error is not None:
            return BucketTiming(bs, error=t.error if rank == 0 else f"rank {rank}: {t.error}")
    if not all(t.valid for t in timings):
        return BucketTiming(bs, error="a rank measured no valid time")
    eager = max(float(t.eager_ms) for t in timings)  # type: ignore[arg-type]
    graph = max(float(t.graph_ms) for t in timings)  # type: ignore[arg-type]
    return BucketTiming(bs, eager, graph)


def _positive(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def _bisection_order(items: Sequence[int]) -> list[int]:
    """Ends first, then midpoints breadth-first: any prefix is spread evenly over the range."""
    if not items:
        return []
    order = [0] if len(items) == 1 else [0, len(items) - 1]
    queue = deque([(0, len(items) - 1)])
    while queue:
        lo, hi = queue.popleft()
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        order.append(mid)
        queue.extend([(lo, mid), (mid, hi)])
    return [items[i] for i in order]


def initial_probes(candidates: Iterable[int]) -> list[int]:
    """The buckets timed first: the smallest, the largest and every power of two between (speedup
    changes on a log scale of batch size), in bisection order so a deadline leaves a spread."""
    c = sorted(set(candidates))
    if not c:
        return []
    probes = sorted({c[0], c[-1]} | {b for b in c if b & (b - 1) == 0})
    return _bisection_order(probes)


def decide_buckets(
    candidates: Iterable[int],
    timings: Mapping[int, BucketTiming],
    min_speedup: float,
) -> list[BucketDecision]:
    """Keep a bucket's graph iff eager / graph >= min_speedup. Unmeasured buckets take their
    timings by linear interpolation (in batch size) between the nearest measured buckets on
    either side, or the nearest one's when only one side was measured. A failed capture or
    timing, or no measurement at all, means eager."""
    measured = sorted(bs for bs, t in timings.items() if t.valid)
    out = []
    for bs in sorted(set(candidates)):
        t = timings.get(bs)
        if t is not None and t.error is not None:
            out.append(BucketDecision(bs, False, None, None, None, "failed", t.error))
            continue
        if t is not None and t.valid:
            eager, graph, source = float(t.eager_ms), float(t.graph_ms), "measured"  # type: ignore[arg-type]
        else:
            lower = [b for b in measured if b < bs]
            upper = [b for b in measured if b > bs]
            if lower and upper:
                lo, hi = timings[lower[-1]], timings[upper[0]]
                w = (bs - lo.batch_size) / (hi.batch_size - lo.batch_size)
                eager = lo.eager_ms + w * (hi.eager_ms - lo.eager_ms)  # type: ignore[operator]
                graph = lo.graph_ms + w * (hi.graph_ms - lo.graph_ms)  # type: ignore[operator]
                source = "interpolated"
            elif lower or upper:
                near = timings[lower[-1] if lower else upper[0]]
                eager, graph = float(near.eager_ms), float(near.graph_ms)  # type: ignore[arg-type]
                source = "extrapolated"
            else:
                out.append(
                    BucketDecision(bs, False, None, None, None, "unmeasured", "nothing was timed")
                )
                continue
        speedup = eager / graph
        keep = speedup >= min_speedup * (1 - 1e-9)
        cmp = ">=" if keep else "<"
        reason = (
            f"eager {eager:.2f} ms / graph {graph:.2f} ms = {speedup:.2f}x {cmp} {min_speedup:g}"
        )
        if source != "measured":
            reason += f" ({source})"
        out.append(BucketDecision(bs, keep, eager, graph, speedup, source, reason))
    return out


def next_refinement(candidates: Iterable[int], decisions: Sequence[BucketDecision]) -> int | None:
    """An untimed bucket to time next: the middle one between two neighbouring timed (or failed)
    buckets that disagree on keeping their graph; None when no such pair is left."""
    c = sorted(set(candidates))
    by_bs = {d.batch_size: d for d in decisions}
    known = [b for b in c if b in by_bs and by_bs[b].source in ("measured", "failed")]
    for a, b in zip(known, known[1:], strict=False):
        if by_bs[a].keep != by_bs[b].keep:
            between = [x for x in c if a < x < b]
            if between:
                return between[len(between) // 2]
    return None


def run_policy(
    candidates: Sequence[int],
    measure: Callable[[int], BucketTiming],
    min_speedup: float,
    out_of_time: Callable[[], bool] = lambda: False,
) -> tuple[dict[int, BucketTiming], list[BucketDecision]]:
    """The decision loop: measure the initial probes, then bisect between neighbours that
    disagree, until nothing is left to refine or time is out (once something valid has been
    measured); decide every candidate from what was measured."""
    timings: dict[int, BucketTiming] = {}
    queue = deque(initial_probes(candidates))
    while True:
        if queue:
            bs = queue.popleft()
        else:
            bs = next_refinement(candidates, decide_buckets(candidates, timings, min_speedup))
            if bs is None:
                break
        if out_of_time() and any(t.valid for t in timings.values()):
            logger.info("CUDA graph decision: timing budget spent; the rest is interpolated")
            break
        timings[bs] = measure(bs)
    return timings, decide_buckets(candidates, timings, min_speedup)


def format_decision_table(decisions: Sequence[BucketDecision], min_speedup: float) -> str:
    lines = [
        f"{'batch':>6} {'eager ms':>9} {'graph ms':>9} {'speedup':>8}  graph (>= {min_speedup:g}x)"
    ]
    for d in decisions:
        e = f"{d.eager_ms:9.2f}" if d.eager_ms is not None else f"{'-':>9}"
        g = f"{d.graph_ms:9.2f}" if d.graph_ms is not None else f"{'-':>9}"
        s = f"{d.speedup:7.2f}x" if d.speedup is not None else f"{'-':>8}"
        verdict = "keep" if d.keep else "release"
        if d.source != "measured":
            verdict += f" ({d.source if d.source != 'failed' else d.reason})"
        lines.append(f"{d.batch_size:>6} {e} {g} {s}  {verdict}")
    return "\n".join(lines)
