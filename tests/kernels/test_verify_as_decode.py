"""A verify step's rows as decode rows (runner/inputs.py as_decode_rows) through the Triton
kernels: the decode kernel over one row per new token (its own KV length, its sequence's
block table) gives what the extend kernel gives over the packed rows, with sliding windows,
soft-caps, split-K and an FP8 cache. Both read the same cache: the step's K/V are stored
before attention in either path (TritonAttentionBackend.forward)."""

from __future__ import annotations

import pytest
import torch

from graphwise.kernels.reference import FP8_KV_DTYPE, quantize_kv_fp8
from graphwise.runner.inputs import as_decode_rows
from tests.kernels.test_kernels import CPU, CUDA, HAS_CUDA, INTERPRET, make_paged, rel_err

pytestmark = [
    pytest.mark.skipif(
        not (INTERPRET or HAS_CUDA), reason="needs a CUDA GPU or TRITON_INTERPRET=1"
    ),
    *([pytest.mark.gpu] if HAS_CUDA else []),  # `-m gpu` runs it on the GPU (scripts/gpu_run.sh)
]


@pytest.mark.parametrize(
    "window,softcap,num_splits,fp8",
    [
        (None, None, 1, False),
        (None, None, 3, False),
        (5, None, 2, False),
        (4, 2.0, 1, False),
        (None, None, 2, True),
        (6, 1.5, 1, True),
    ],
    ids=["plain", "split", "window", "window-softcap", "fp8", "fp8-window-softcap"],
)
def test_decode_rows_equal_the_extend_kernel(kern, window, softcap, num_splits, fp8) -> None:
    device = CUDA if HAS_CUDA else CPU
    q_lens, lens, hq, hkv, d, page = [4, 1, 3, 5], [11, 14, 5, 21], 4, 2, 32, 4
    p = make_paged(lens, page, hkv, d, torch.float32, device)
    k_cache, v_cache, k_scale, v_scale = p.k_cache, p.v_cache, 1.0, 1.0
    if fp8:
        k_scale, v_scale = 0.5, 2.0
        k_cache, v_cache = quantize_kv_fp8(k_cache, k_scale), quantize_kv_fp8(v_cache, v_scale)
        assert k_cache.dtype == FP8_KV_DTYPE
    q = torch.randn(sum(q_lens), hq, d, device=device)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    opts = {"sliding_window": window, "softcap": softcap, "k_scale": k_scale, "v_scale": v_scale}
    extend = kern.extend_attention(
        q, k_cache, v_cache, cu.to(device), p.seq_lens, p.block_tables, 0.3,
        max_q_len=max(q_lens), **opts,
    )  # fmt: skip
    tables, seq_lens = as_decode_rows(p.block_tables.cpu().numpy(), q_lens, lens)
    decode = kern.decode_attention(
        q, k_cache, v_cache, torch.from_numpy(tables).to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device), 0.3,
        num_splits=num_splits, block_n=16, **opts,
    )  # fmt: skip
    assert not decode.isnan().any()
    assert rel_err(decode, extend) <= 1e-4
