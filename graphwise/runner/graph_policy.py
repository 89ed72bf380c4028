"""Which CUDA graphs pay for themselves, and what the kept ones cost in memory.

`cuda_graph="auto"` (the default on CUDA) runs `plan_cuda_graphs` before the KV pool is sized:

1. a small scratch KV cache is allocated (the largest bucket x a modest context);
2. a few probe buckets are captured and each is timed both ways on a fixed synthetic decode step
   (a padding-free batch of `bs` sequences with `context_len` tokens of context each): eager
   forward + LM head + argmax against graph replay + LM head + argmax, CUDA events, a few warm-ups,
   the median of up to ten alternating repetitions, within a time budget;
3. where two neighbouring probes disagree the buckets between them are timed by bisection; the
   rest are interpolated (speedup varies smoothly with batch size);
4. a graph is kept where eager / graph >= `cuda_graph_min_speedup`; released buckets decode
   eagerly (a batch is never padded up past a released bucket into a larger graph);
5. the graphs are dropped and the kept buckets captured again on the scratch cache, alone, to
   measure their pool (then the rest, to know what capturing everything would have cost);
6. everything is freed; the engine sizes the KV pool with the measured pool of the kept graphs
   (runner/memory.py) and captures only those for real.

`cuda_graph="on"` with the KV pool sized by utilization does only step 5 (every bucket is kept).

The decision logic itself (`initial_probes`, `decide_buckets`, `next_refinement`) is pure and
unit-tested (runner/graph_decision.py); the rest needs a GPU.

Under tensor parallelism every rank runs this at once (the timed steps' all-reduces pair up)
and the ranks agree at each branch: a bucket's timing is the slowest rank's (every rank's
timing is gathered and combined the same way everywhere, `graph_decision.slowest_rank`), the
time budget and the scratch context are rank 0's, and any rank's failed capture fails the
bucket (`parallel_state.agree` / `agree_all`); so every rank keeps the same buckets. Under
pipeline parallelism (graphs there are opt-in: `GRAPHWISE_PP_CUDA_GRAPHS=1`) each stage times
its own layers alone, and the slowest stage decides for all.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from graphwise.distributed import parallel_state
from graphwise.runner.graph_decision import (
    BucketDecision,
    BucketTiming,
    format_decision_table,
    initial_probes,
    run_policy,
    slowest_rank,
)
from graphwise.runner.step_timing import (
    decode_step,
    synthetic_decode_inputs,
    synthetic_intermediate,
    time_steps,
)

if TYPE_CHECKING:
    from graphwise.config import EngineConfig, RunnerLimits
    from graphwise.runner.cuda_graph import CaptureStats, CudaGraphRunner
    from graphwise.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

DECISION_CONTEXT = 256  # tokens of context per sequence in the timed synthetic step
TIMING_BUDGET_S = 4.0  # for all timing (captures come on top)
SCRATCH_KV_FRACTION = 0.2  # of free memory, at most, for the scratch KV cache


# ---- the plan the engine sizes memory with ----------------------------------------------------
@dataclass
class GraphPlan:
    mode: str  # "auto" | "on"
    candidates: list[int]
    kept: list[int]
    eager_buckets: list[int] = field(default_factory=list)
    decisions: list[BucketDecision] = field(default_factory=list)  # empty for "on"
    min_speedup: float = 1.05
    context_len: int = 0
    seconds: float = 0.0  # the whole plan: captures, timing, measuring
    timing_seconds: float = 0.0
    timed: list[int] = field(default_factory=list)
    pool_bytes: int | None = None  # measured pool of the kept graphs (None: not measured)
    pool_all_bytes: int | None = None  # measured pool of every candidate that captures
    captured_pool_bytes: int | None = None  # what the real capture then took

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record_capture(self, stats: CaptureStats) -> None:
        """Called after the real capture: compare the planned pool with the one it took."""
        self.captured_pool_bytes = stats.pool_bytes
        if self.pool_bytes is not None and stats.pool_bytes > self.pool_bytes + (64 << 20):
            logger.warning(
                "CUDA graphs took %.1f MiB, %.1f MiB more than measured while planning: the "
                "card is that much past gpu_memory_utilization",
                stats.pool_bytes / 2**20,
                (stats.pool_bytes - self.pool_bytes) / 2**20,
            )


def candidate_buckets(config: EngineConfig) -> list[int]:
    from graphwise.runner.cuda_graph import capture_sizes

    max_bs = config.cuda_graph_max_rows
    return capture_sizes(max_bs)


# ---- on the GPU: the runner's start-up ------------------------------------------------------
def plan_cuda_graphs(runner: ModelRunner, limits: RunnerLimits) -> GraphPlan | None:
    """Decide which buckets keep a graph ("auto") and measure their pool before the KV pool is
    sized. None where nothing needs planning: no CUDA, graphs off, pipeline parallel without
    its opt-in (decode runs eagerly there), or "on" with the KV size fixed by the user (then
    every bucket is captured after allocation)."""
    cfg = runner.config
    mode = cfg.use_cuda_graph
    if not runner.graphs_possible:
        return None
    kv_fixed = cfg.kv_cache_memory is not None or cfg.num_gpu_blocks_override is not None
    if mode == "on" and kv_fixed:
        return None
    candidates = candidate_buckets(cfg)
    started = time.perf_counter()
    plan = GraphPlan(
        mode=mode,
        candidates=candidates,
        kept=list(candidates),
        min_speedup=cfg.cuda_graph_min_speedup,
    )
    try:
        with torch.inference_mode():
            plan.context_len = _allocate_scratch_kv(runner, limits, max(candidates))
            if mode == "auto":
                _decide(runner, limits, plan)
            if not kv_fixed:
                _measure_pools(runner, limits, plan)
    finally:
        _release_scratch(runner)
    plan.seconds = time.perf_counter() - started
    if mode == "auto" and runner.is_driver:
        kept = plan.kept
        logger.info(
            "CUDA graph decision (auto, %.1f s, %d of %d buckets timed at context %d): keep %d "
            "(%s), eager %d (%s)\n%s",
            plan.seconds,
            len(plan.timed),
            len(candidates),
            plan.context_len,
            len(kept),
            _ranges(kept),
            len(plan.eager_buckets),
            _ranges(plan.eager_buckets),
            format_decision_table(plan.decisions, plan.min_speedup),
        )
    if plan.pool_bytes is not None and runner.is_driver:
        logger.info(
            "CUDA graph pool measured by capturing (%s plan, %.1f s in all): %.1f MiB for the %d "
            "kept graphs, %.1f MiB for every bucket",
            plan.mode,
            plan.seconds,
            plan.pool_bytes / 2**20,
            len(plan.kept),
            (plan.pool_all_bytes or 0) / 2**20,
        )
    return plan


def _ranges(buckets: Sequence[int]) -> str:
    if not buckets:
        return "none"
    if len(buckets) <= 4:
        return ",".join(map(str, buckets))
    return f"{buckets[0]}..{buckets[-1]}"


def _allocate_scratch_kv(runner: ModelRunner, limits: RunnerLimits, max_bs: int) -> int:
    """Allocate a KV cache for max_bs sequences of a modest context; returns that context."""
    cfg = runner.config
    block = cfg.block_size
    per_token = runner.kv_bytes_per_token()
    max_len = limits.max_model_len
    graph_context = min(cfg.cuda_graph_max_context or max_len, max_len)
    context = max(1, min(DECISION_CONTEXT, max_len - 1, graph_context))
    free, _ = torch.cuda.mem_get_info(runner.device)
    allowed = int(free * SCRATCH_KV_FRACTION)
    fit = allowed // max(1, max_bs * per_token)
    if fit < context:
        context = max(1, min(context, (fit // block) * block))
    context = parallel_state.agree(context)  # ranks with less free memory must not differ
    runner.allocate_kv_cache(max_bs * -(-context // block))
    return context


def _release_scratch(runner: ModelRunner) -> None:
    runner.release_kv_cache()  # also drops the backend's graph buffers and workspace
    gc.collect()
    torch.cuda.synchronize(runner.device)
    torch.cuda.empty_cache()


def _decide(runner: ModelRunner, limits: RunnerLimits, plan: GraphPlan) -> None:
    from graphwise.runner.cuda_graph import CudaGraphRunner

    graphs = CudaGraphRunner(runner, runner.config, limits.max_model_len, buckets=plan.candidates)
    probes = initial_probes(plan.candidates)
    failed: dict[int, BucketTiming] = {}
    for bs in sorted(probes, reverse=True):  # largest first: the smaller ones share its pool
        error = graphs.try_capture(bs)
        if error is not None:
            failed[bs] = BucketTiming(bs, error=error)
    per_bucket = TIMING_BUDGET_S / max(1, len(probes) + 2)

    def measure(bs: int) -> BucketTiming:
        if bs in failed:
            return failed[bs]
        if bs not in graphs.graphs:
            error = graphs.try_capture(bs)
            if error is not None:
                return BucketTiming(bs, error=error)
        # The slowest rank's numbers decide for everyone (each rank computes the same max
        # from the same gathered list): the ranks' clocks and shards differ.
        return agreed_timing(_time_bucket(runner, graphs, bs, plan.context_len, per_bucket))

    started = time.perf_counter()
    deadline = started + TIMING_BUDGET_S
    timings, plan.decisions = run_policy(
        plan.candidates,
        measure,
        plan.min_speedup,
        lambda: parallel_state.agree(time.perf_counter() > deadline),
    )
    plan.timing_seconds = time.perf_counter() - started
    plan.timed = sorted(bs for bs, t in timings.items() if t.valid)
    plan.kept = [d.batch_size for d in plan.decisions if d.keep]
    plan.eager_buckets = [d.batch_size for d in plan.decisions if not d.keep]
    graphs.release(set())  # free the decision's graphs (and their pool) before measuring


def agreed_timing(mine: BucketTiming) -> BucketTiming:
    """This rank's timing of a bucket combined with every other rank's: the slowest rank's
    (the same value on every rank; this rank's own outside a parallel group)."""
    return slowest_rank(parallel_state.agree_all(mine))


def _time_bucket(
    runner: ModelRunner,
    graphs: CudaGraphRunner,
    bs: int,
    context_len: int,
    budget_s: float,
) -> BucketTiming:
    try:
        inputs = synthetic_decode_inputs(runner, bs, context_len)
        inter = synthetic_intermediate(runner, bs)  # a pipeline stage after the first
        ms = time_steps(
            {
                "eager": lambda: decode_step(runner, inputs, None, inter),
                "graph": lambda: decode_step(runner, inputs, graphs, inter),
            },
            runner.device,
            budget_s=budget_s,
            agree=parallel_state.agree,
        )
    except RuntimeError as exc:
        if runner.parallel.world_size > 1:
            raise  # one rank out of the timed steps' collectives: stop rather than hang the rest
        message = (str(exc).splitlines() or [type(exc).__name__])[0]
        logger.warning("timing batch %d failed (%s): eager", bs, message)
        return BucketTiming(bs, error=f"timing failed: {message}")
    return BucketTiming(bs, statistics.median(ms["eager"]), statistics.median(ms["graph"]))


def _free_bytes(device: torch.device) -> int:
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()  # cached blocks are not taken
    return torch.cuda.mem_get_info(device)[0]


def _capture_measured(
    graphs: CudaGraphRunner, sizes: Iterable[int], free_before: int | None = None
) -> tuple[int, dict[int, str]]:
    """Capture `sizes` largest first into the runner's pool; returns the device memory taken
    since `free_before` (default: now) and the sizes that failed."""
    device = graphs.runner.device
    if free_before is None:
        free_before = _free_bytes(device)
    failed: dict[int, str] = {}
    for bs in sorted(sizes, reverse=True):
        error = graphs.try_capture(bs, warmup=1)  # kernels are compiled and tuned by now
        if error is not None:
            failed[bs] = error
    return max(0, free_before - _free_bytes(device)), failed


def _measure_pools(runner: ModelRunner, limits: RunnerLimits, plan: GraphPlan) -> None:
    """Capture the kept buckets alone on the scratch cache, then the others into the same pool:
    the kept graphs' pool, and what capturing every bucket takes (this rank's own numbers)."""
    from graphwise.runner.cuda_graph import CudaGraphRunner

    free_before = _free_bytes(runner.device)
    # the runner's static buffers and attention workspace count as graph memory too
    graphs = CudaGraphRunner(runner, runner.config, limits.max_model_len, buckets=plan.candidates)
    failed_before = {d.batch_size for d in plan.decisions if d.source == "failed"}
    pool_kept, failed = _capture_measured(graphs, plan.kept, free_before)
    rest = [b for b in plan.candidates if b not in plan.kept and b not in failed_before]
    pool_rest, _ = _capture_measured(graphs, rest)
    if failed:
        plan.kept = [b for b in plan.kept if b not in failed]
        plan.eager_buckets = sorted(set(plan.eager_buckets) | set(failed))
        plan.decisions = [
            BucketDecision(
                d.batch_size,
                False,
                d.eager_ms,
                d.graph_ms,
                d.speedup,
                "failed",
                failed[d.batch_size],
            )
            if d.batch_size in failed
            else d
            for d in plan.decisions
        ]
    plan.pool_bytes = pool_kept if plan.kept else 0
    plan.pool_all_bytes = pool_kept + pool_rest
    graphs.release(set())
