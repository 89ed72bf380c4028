"""Start-up agreement across ranks (gloo, two processes): `agree` hands every rank rank 0's
value, `agree_all` everyone's; the CUDA-graph decision loop, fed each rank's own (different,
faked) timings, ends with the same buckets on every rank, decided by the slowest rank's times
(`graph_policy.agreed_timing`), which is what lets the `auto` policy run under tensor and
pipeline parallelism (a TP step waits for its slowest rank, a pipeline for its slowest stage)."""

from __future__ import annotations

import datetime
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

CANDIDATES = list(range(1, 129))


def _graph_ms(rank: int, bs: int) -> float:
    # Each rank's clock (or stage) says something else; near the crossover they would disagree.
    return 1.0 + 0.01 * bs + (0.3 if rank == 1 else 0.0)


def _rank_main(rank: int, port: int, results: object) -> None:
    from graphwise.distributed import parallel_state
    from graphwise.distributed.parallel_state import ParallelContext
    from graphwise.runner.graph_decision import BucketTiming, run_policy
    from graphwise.runner.graph_policy import agreed_timing

    ctx = ParallelContext.from_rank(rank, tp_size=2, pp_size=1)
    timeout = datetime.timedelta(seconds=30)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timeout)
    parallel_state.initialize(ctx, "gloo", timeout, store=store)
    try:
        agreed = parallel_state.agree(f"rank {rank}")
        everyone = parallel_state.agree_all(rank * 10)

        def measure(bs: int) -> BucketTiming:
            return agreed_timing(BucketTiming(bs, 2.0, _graph_ms(rank, bs)))

        _, decisions = run_policy(CANDIDATES, measure, 1.05)
        kept = [d.batch_size for d in decisions if d.keep]

        def stages(bs: int) -> BucketTiming:
            # A pipeline: stage 1 is slower eagerly (more layers), stage 0 as a graph; one
            # bucket fails to capture on rank 1 only.
            if bs == 64 and rank == 1:
                return agreed_timing(BucketTiming(bs, error="capture failed: out of memory"))
            eager = 2.0 + (0.5 if rank == 1 else 0.0)
            return agreed_timing(BucketTiming(bs, eager, 1.5 + 0.01 * bs * (2 - rank)))

        _, pipeline = run_policy(CANDIDATES, stages, 1.05)
        results.put((rank, agreed, everyone, kept, pipeline))  # type: ignore[attr-defined]
    finally:
        parallel_state.destroy()


def test_ranks_agree_on_values_and_on_the_slowest_ranks_graph_decision() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    (_, agreed0, all0, kept0, pipe0), (_, agreed1, all1, kept1, pipe1) = got
    assert agreed0 == agreed1 == "rank 0"
    assert all0 == all1 == [0, 10]
    assert kept0 == kept1 and kept0
    # Rank 1's slower graph decides: keep while 2.0 / (1.3 + 0.01 bs) >= 1.05 (rank 0's own
    # numbers would keep up to 90).
    assert max(kept0) == max(b for b in CANDIDATES if 2.0 / _graph_ms(1, b) >= 1.05) == 60
    assert max(kept0) < max(b for b in CANDIDATES if 2.0 / _graph_ms(0, b) >= 1.05)
    assert pipe0 == pipe1  # every field: times, speedups, sources, reasons
    by_bs = {d.batch_size: d for d in pipe0}
    assert by_bs[64].source == "failed" and "rank 1: capture failed" in by_bs[64].reason
    # eager is stage 1's 2.5 ms, graph stage 0's 1.5 + 0.02 bs: keep while 2.5 / graph >= 1.05
    assert by_bs[32].eager_ms == 2.5 and by_bs[32].graph_ms == pytest.approx(1.5 + 0.02 * 32)
    kept = [d.batch_size for d in pipe0 if d.keep]
    assert max(kept) == max(b for b in range(1, 64) if 2.5 / (1.5 + 0.02 * b) >= 1.05)
