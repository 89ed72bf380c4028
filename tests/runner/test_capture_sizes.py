from __future__ import annotations

import pytest

from graphwise.runner.cuda_graph import capture_sizes


@pytest.mark.parametrize("max_bs", [1, 2, 3, 7, 8, 9, 20, 64, 100, 256, 300, 512])
def test_buckets_cover_every_batch_up_to_the_maximum(max_bs):
    sizes = capture_sizes(max_bs)
    assert sizes == sorted(set(sizes))
    assert sizes[0] == 1 and sizes[-1] == max_bs
    # every batch size has a bucket no larger than twice itself (bounded padding waste)
    for n in range(1, max_bs + 1):
        bucket = next(s for s in sizes if s >= n)
        assert bucket - n < max(8, n)
