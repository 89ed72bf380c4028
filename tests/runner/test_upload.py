"""Uploader: one transfer, parts intact and each on a 16-byte boundary (Triton
specializes on pointer alignment; batch-dependent offsets would recompile kernels mid-run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphwise.runner.inputs import Uploader


@pytest.mark.parametrize(
    ("dtype", "as_array"),
    [(torch.int64, False), (torch.int32, False), (torch.float32, False)]
    + [(torch.int64, True), (torch.int32, True)],  # arrays: the int paths (block tables)
)
def test_parts_round_trip_and_are_aligned(dtype, as_array):
    parts = [[1, 2, 3], [], [4], list(range(5, 12)), [7, 7]]
    given = [np.array(p) for p in parts] if as_array else parts
    if as_array:
        given[1] = given[1].astype(np.int64)
    out = Uploader(torch.device("cpu"))(dtype, *given)
    assert [t.tolist() for t in out] == [
        [float(v) for v in p] if dtype == torch.float32 else p for p in parts
    ]
    base = out[0].data_ptr()
    for t in out:
        assert t.dtype == dtype
        assert (t.data_ptr() - base) % 16 == 0, "part not on a 16-byte boundary"
