"""Start-up agreement across ranks (gloo, two processes): `agree` hands every rank rank 0's
value, `agree_all` everyone's; the CUDA-graph decision loop, fed each rank's own (different)
timings through `agree`, ends with the same buckets on every rank, which is what lets the
`auto` policy run under tensor parallelism (their timed steps' collectives must pair up)."""

from __future__ import annotations

import datetime
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow


def _rank_main(rank: int, port: int, results: object) -> None:
    from graphwise.distributed import parallel_state
    from graphwise.distributed.parallel_state import ParallelContext
    from graphwise.runner.graph_decision import BucketTiming, run_policy

    ctx = ParallelContext.from_rank(rank, tp_size=2, pp_size=1)
    timeout = datetime.timedelta(seconds=30)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timeout)
    parallel_state.initialize(ctx, "gloo", timeout, store=store)
    try:
        agreed = parallel_state.agree(f"rank {rank}")
        everyone = parallel_state.agree_all(rank * 10)

        def measure(bs: int) -> BucketTiming:
            # Each rank's clock says something else; near the crossover they would disagree.
            graph = 1.0 + 0.01 * bs + (0.3 if rank == 1 else 0.0)
            return parallel_state.agree(BucketTiming(bs, 2.0, graph))

        _, decisions = run_policy(list(range(1, 129)), measure, 1.05)
        kept = [d.batch_size for d in decisions if d.keep]
        results.put((rank, agreed, everyone, kept))  # type: ignore[attr-defined]
    finally:
        parallel_state.destroy()


def test_ranks_agree_on_rank_zeros_values_and_on_the_graph_decision() -> None:
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
    (_, agreed0, all0, kept0), (_, agreed1, all1, kept1) = got
    assert agreed0 == agreed1 == "rank 0"
    assert all0 == all1 == [0, 10]
    assert kept0 == kept1 and kept0  # rank 0's numbers: keep while 2.0 / graph >= 1.05
    assert max(kept0) == max(b for b in range(1, 129) if 2.0 / (1.0 + 0.01 * b) >= 1.05)
