from __future__ import annotations

import numpy as np

from graphwise.engine.block_manager import BlockManager
from graphwise.engine.sequence import Sequence
from graphwise.runner.model_runner import BlockTableRows
from graphwise.sampling_params import SamplingParams


def seq(rid: str, n: int) -> Sequence:
    return Sequence(rid, None, list(range(n)), SamplingParams())


def test_rows_follow_growth_release_and_reallocation():
    bm = BlockManager(num_blocks=32, block_size=4, enable_prefix_caching=False)
    rows = BlockTableRows()
    a, b = seq("a", 6), seq("b", 2)
    assert bm.allocate_slots(a, 6) and bm.allocate_slots(b, 2)
    t = rows.build([a, b])
    assert t.dtype == np.int32 and t.shape == (2, 2)
    assert t[0].tolist() == a.block_table and t[1].tolist() == [b.block_table[0], 0]
    assert bm.allocate_slots(a, 13)  # grows in place: the cached row is extended
    assert rows.build([a, b])[0].tolist() == a.block_table
    # Preemption: released, then reallocated to the same length with other blocks.
    old = list(a.block_table)
    bm.release(a)
    filler = seq("f", 4)
    assert bm.allocate_slots(filler, 4)  # takes one of a's old blocks first
    assert bm.allocate_slots(a, 13)
    assert len(a.block_table) == len(old) and a.block_table != old
    assert rows.build([b, a])[1].tolist() == a.block_table
    assert rows.build([a])[0].tolist() == a.block_table  # b left the batch: no stale row needed
