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
unit-tested; the rest needs a GPU.
"""

from __future__ import annotations

import gc
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from graphwise.layers.attention import AttentionMetadata, ForwardContext

if TYPE_CHECKING:
    from graphwise.config import EngineConfig
    from graphwise.engine.engine import LLMEngine
    from graphwise.runner.cuda_graph import CaptureStats, CudaGraphRunner
    from graphwise.runner.model_runner import ModelRunner, StepInputs

logger = logging.getLogger(__name__)

DECISION_CONTEXT = 256  # tokens of context per sequence in the timed synthetic step
WARMUP_STEPS = 2
TIMED_STEPS = 10  # per mode and bucket, at most (fewer when a step is slow)
TIMING_BUDGET_S = 4.0  # for all timing (captures come on top)
SCRATCH_KV_FRACTION = 0.2  # of free memory, at most, for the scratch KV cache


# ---- pure decision logic ------------------------------------------------------------------
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

    max_bs = min(config.cuda_graph_max_bs or config.max_num_seqs, config.max_num_seqs)
    return capture_sizes(max_bs)


# ---- the synthetic decode step (also used by `graphwise explain`) ----------------------------
def synthetic_decode_inputs(runner: ModelRunner, batch_size: int, context_len: int) -> StepInputs:
    """A padding-free decode step: `batch_size` sequences, each with `context_len` tokens in its
    own KV blocks (the first batch_size x ceil(context_len / block_size) blocks of the cache),
    each adding its token at position context_len - 1."""
    from graphwise.runner.model_runner import StepInputs

    block = runner.block_size
    per_seq = -(-context_len // block)
    need = batch_size * per_seq
    if need > runner.num_blocks:
        raise ValueError(
            f"a synthetic step of {batch_size} x {context_len} tokens needs {need} KV blocks, "
            f"the cache has {runner.num_blocks}"
        )
    dev = runner.device
    tables = torch.arange(need, dtype=torch.int32, device=dev).view(batch_size, per_seq)
    last = context_len - 1
    slots = tables[:, last // block].to(torch.int64) * block + last % block
    meta = AttentionMetadata(
        slot_mapping=slots,
        seq_lens=torch.full((batch_size,), context_len, dtype=torch.int32, device=dev),
        block_tables=tables,
        cu_seqlens_q=torch.arange(batch_size + 1, dtype=torch.int32, device=dev),
        is_decode=True,
        max_q_len=1,
        max_seq_len=context_len,
        q_lens_cpu=[1] * batch_size,
        seq_lens_cpu=[context_len] * batch_size,
    )
    vocab = runner.model_config.vocab_size
    ids = (torch.arange(batch_size, dtype=torch.int64, device=dev) * 7919 + 11) % vocab
    return StepInputs(
        input_ids=ids,
        positions=torch.full((batch_size,), last, dtype=torch.int64, device=dev),
        meta=meta,
        logits_indices=torch.arange(batch_size, dtype=torch.int64, device=dev),
        sample_seqs=[],
    )


def decode_step(
    runner: ModelRunner, inputs: StepInputs, graphs: CudaGraphRunner | None = None
) -> torch.Tensor:
    """One decode step without the host-side parts both modes share (scheduling, input upload,
    detokenizing): forward (eager, or graph replay when `graphs` is given), LM head, argmax.
    Call under torch.inference_mode()."""
    if graphs is not None:
        hidden = graphs.replay(inputs)
    else:
        ctx = ForwardContext(inputs.meta, runner.backend, runner.kv_caches)
        hidden = runner.model(inputs.input_ids, inputs.positions, ctx)
    logits = runner.model.compute_logits(hidden[inputs.logits_indices])  # type: ignore[operator]
    return logits.argmax(dim=-1)


def time_steps(
    steps: Mapping[str, Callable[[], object]],
    device: torch.device,
    warmup: int = WARMUP_STEPS,
    reps: int = TIMED_STEPS,
    budget_s: float | None = None,
    enqueue_out: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Milliseconds per call of each step, the steps alternating, the device idle before each
    call (like the engine's steps, which end in a host sync). CUDA events on CUDA, wall time
    otherwise. With `budget_s`, fewer repetitions (at least 3) when one round is slow. With
    `enqueue_out`, also the host time of each same call up to its return, before the sync (the
    CPU enqueue time): pairing the two per call keeps host-speed drift out of their comparison."""
    out: dict[str, list[float]] = {name: [] for name in steps}
    cuda = device.type == "cuda"
    if cuda:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
    for _ in range(warmup):
        for fn in steps.values():
            fn()
        if cuda:
            torch.cuda.synchronize(device)
    rep = 0
    round_started = time.perf_counter()
    while rep < reps:
        for name, fn in steps.items():
            if cuda:
                t = time.perf_counter()
                start.record()
                fn()
                end.record()
                if enqueue_out is not None:
                    enqueue_out.setdefault(name, []).append((time.perf_counter() - t) * 1e3)
                end.synchronize()
                out[name].append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                out[name].append((time.perf_counter() - t) * 1e3)
        rep += 1
        if rep == 1 and budget_s is not None:
            round_s = time.perf_counter() - round_started
            reps = max(3, min(reps, int(budget_s / max(round_s, 1e-9))))
    return out


# ---- on the GPU: the engine's start-up -----------------------------------------------------
def plan_cuda_graphs(engine: LLMEngine) -> GraphPlan | None:
    """Decide which buckets keep a graph ("auto") and measure their pool before the KV pool is
    sized. None where nothing needs planning: no CUDA, graphs off, tensor/pipeline parallel, or
    "on" with the KV size fixed by the user (then every bucket is captured after allocation)."""
    cfg = engine.config
    mode = cfg.use_cuda_graph
    if engine.device.type != "cuda" or mode == "off":
        return None
    if cfg.tensor_parallel_size * cfg.pipeline_parallel_size > 1:
        return None  # a parallel runner captures on every rank itself (fixed graph reserve)
    kv_fixed = cfg.kv_cache_memory is not None or cfg.num_gpu_blocks_override is not None
    if mode == "on" and kv_fixed:
        return None
    runner = engine.runner
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
            plan.context_len = _allocate_scratch_kv(engine, max(candidates))
            if mode == "auto":
                _decide(engine, plan)
            if not kv_fixed:
                _measure_pools(engine, plan)
    finally:
        _release_scratch(runner)
    plan.seconds = time.perf_counter() - started
    if mode == "auto":
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
    if plan.pool_bytes is not None:
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


def _allocate_scratch_kv(engine: LLMEngine, max_bs: int) -> int:
    """Allocate a KV cache for max_bs sequences of a modest context; returns that context."""
    runner = engine.runner
    cfg = engine.config
    block = cfg.block_size
    per_token = engine.model_config.kv_bytes_per_token(engine.dtype)
    graph_context = min(cfg.cuda_graph_max_context or engine.max_model_len, engine.max_model_len)
    context = max(1, min(DECISION_CONTEXT, engine.max_model_len - 1, graph_context))
    free, _ = torch.cuda.mem_get_info(engine.device)
    allowed = int(free * SCRATCH_KV_FRACTION)
    fit = allowed // max(1, max_bs * per_token)
    if fit < context:
        context = max(1, min(context, (fit // block) * block))
    runner.allocate_kv_cache(max_bs * -(-context // block))
    return context


def _release_scratch(runner: ModelRunner) -> None:
    from graphwise.layers.attention.torch_backend import TorchAttentionBackend

    runner.kv_caches = []
    runner.num_blocks = 0
    runner.backend = TorchAttentionBackend(scratch_slot=0)  # drops graph buffers and workspace
    gc.collect()
    torch.cuda.synchronize(runner.device)
    torch.cuda.empty_cache()


def _try_capture(graphs: CudaGraphRunner, bs: int, warmup: int = 2) -> str | None:
    try:
        graphs.capture(bs, warmup=warmup)
    except RuntimeError as exc:  # out of memory, or a failed capture: this bucket stays eager
        message = (str(exc).splitlines() or [type(exc).__name__])[0]
        logger.warning("CUDA graph capture for batch %d failed (%s): eager", bs, message)
        torch.cuda.synchronize(graphs.runner.device)
        torch.cuda.empty_cache()
        return f"capture failed: {message}"
    return None


def _decide(engine: LLMEngine, plan: GraphPlan) -> None:
    from graphwise.runner.cuda_graph import CudaGraphRunner

    runner = engine.runner
    graphs = CudaGraphRunner(runner, engine.config, engine.max_model_len, buckets=plan.candidates)
    probes = initial_probes(plan.candidates)
    failed: dict[int, BucketTiming] = {}
    for bs in sorted(probes, reverse=True):  # largest first: the smaller ones share its pool
        error = _try_capture(graphs, bs)
        if error is not None:
            failed[bs] = BucketTiming(bs, error=error)
    per_bucket = TIMING_BUDGET_S / max(1, len(probes) + 2)

    def measure(bs: int) -> BucketTiming:
        if bs in failed:
            return failed[bs]
        if bs not in graphs.graphs:
            error = _try_capture(graphs, bs)
            if error is not None:
                return BucketTiming(bs, error=error)
        return _time_bucket(runner, graphs, bs, plan.context_len, engine.device, per_bucket)

    started = time.perf_counter()
    deadline = started + TIMING_BUDGET_S
    timings, plan.decisions = run_policy(
        plan.candidates, measure, plan.min_speedup, lambda: time.perf_counter() > deadline
    )
    plan.timing_seconds = time.perf_counter() - started
    plan.timed = sorted(bs for bs, t in timings.items() if t.valid)
    plan.kept = [d.batch_size for d in plan.decisions if d.keep]
    plan.eager_buckets = [d.batch_size for d in plan.decisions if not d.keep]
    graphs.graphs.clear()  # free the decision's graphs (and their pool) before measuring
    graphs.outputs.clear()


def _time_bucket(
    runner: ModelRunner,
    graphs: CudaGraphRunner,
    bs: int,
    context_len: int,
    device: torch.device,
    budget_s: float,
) -> BucketTiming:
    try:
        inputs = synthetic_decode_inputs(runner, bs, context_len)
        ms = time_steps(
            {
                "eager": lambda: decode_step(runner, inputs),
                "graph": lambda: decode_step(runner, inputs, graphs),
            },
            device,
            budget_s=budget_s,
        )
    except RuntimeError as exc:
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
        error = _try_capture(graphs, bs, warmup=1)  # kernels are compiled and tuned by now
        if error is not None:
            failed[bs] = error
    return max(0, free_before - _free_bytes(device)), failed


def _measure_pools(engine: LLMEngine, plan: GraphPlan) -> None:
    """Capture the kept buckets alone on the scratch cache, then the others into the same pool:
    the kept graphs' pool, and what capturing every bucket takes."""
    from graphwise.runner.cuda_graph import CudaGraphRunner

    free_before = _free_bytes(engine.device)
    # the runner's static buffers and attention workspace count as graph memory too
    graphs = CudaGraphRunner(
        engine.runner, engine.config, engine.max_model_len, buckets=plan.candidates
    )
    failed_before = {d.batch_size for d in plan.decisions if d.source == "failed"}
    pool_kept, failed = _capture_measured(graphs, plan.kept, free_before)
    rest = [b for b in plan.candidates if b not in plan.kept and b not in failed_before]
    pool_rest, _ = _capture_measured(graphs, rest)
    if failed:
        plan.kept = [b for b in plan.kept if b not in failed]
        plan.eager_buckets = sorted(set(plan.eager_buckets) | set(failed))
        if plan.decisions:
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
    del graphs
