"""GGUF packed weights: the torch reference against ``gguf.quants.dequantize`` (bit-exact), and
the Triton GEMV / GEMM / dequantize kernels against an fp32 dequantize-then-matmul.

Tolerances (relative to max |reference|): fp32 x through the interpreter 1e-5 (IEEE dots,
only the summation order differs); bf16 x on a GPU 1.5e-2 (the dequantized weight tile is
rounded to bf16 for tensor-core dots, the output to bf16: ~2^-8 each; measured 2-4e-3).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gq = pytest.importorskip("graphwise.kernels.gguf_quant", reason="triton is not installed")

QTYPES = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def gguf():
    """The ``gguf`` package (the reference); only the bit-exactness tests need it."""
    return pytest.importorskip("gguf")


def _gguf_ref(packed: torch.Tensor, name: str) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(packed.cpu().numpy(), gguf.GGMLQuantizationType[name])


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(
        np.ascontiguousarray(a, dtype=np.float32).view(np.uint32),
        np.ascontiguousarray(b, dtype=np.float32).view(np.uint32),
    )


@pytest.mark.parametrize("name", QTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_dequantize_is_bit_exact(gguf, name, seed):
    k = 512 if name.endswith("_K") else 96
    packed = gq.random_packed(name, 24, k, seed=seed)
    got = gq.dequantize(packed, name, k)
    assert got.dtype == torch.float32 and got.shape == (24, k)
    assert _same_bits(got.numpy(), _gguf_ref(packed, name))


@pytest.mark.parametrize("name", QTYPES)
def test_reference_dequantize_edge_scales(gguf, name):
    """Zero, negative, subnormal and large fp16 scales, every code value (random bytes)."""
    k = 256
    packed = gq.random_packed(name, 8, k, seed=5)
    elems, nbytes = gq.block_shape(name)
    blocks = packed.view(-1, nbytes)
    specials = torch.tensor([0.0, -0.0, -1.5, 6.0e-8, 3.0e4, -(2.0**-14)], dtype=torch.float16)
    offs = {"Q6_K": [208], "Q8_0": [0], "Q4_0": [0]}.get(name, [0, 2])
    for i in range(blocks.shape[0]):
        for off in offs:
            blocks[i, off : off + 2] = specials[(i + off) % len(specials) :][:1].view(torch.uint8)
    assert _same_bits(gq.dequantize(packed, name, k).numpy(), _gguf_ref(packed, name))


def test_reference_dequantize_default_model_tensors(gguf):
    """The embedded default model's own tensors (Q4_1 layers, the Q8_0 embedding)."""
    from graphwise.models.default import default_model_path

    try:
        path = default_model_path()
    except ValueError as exc:
        pytest.skip(str(exc))
    reader = gguf.GGUFReader(str(path))
    seen: dict[str, int] = {}
    for t in reader.tensors:
        name = t.tensor_type.name
        if name not in QTYPES or seen.get(name, 0) >= 3:
            continue
        seen[name] = seen.get(name, 0) + 1
        packed = torch.from_numpy(np.array(t.data[:4096]))
        k = int(t.shape[0])
        assert packed.shape[1] == gq.bytes_per_row(name, k)
        got = gq.dequantize(packed, name, k).numpy()
        ref = gguf.quants.dequantize(np.array(t.data[:4096]), t.tensor_type)
        assert _same_bits(got, ref), t.name
    assert seen.get("Q4_1", 0) > 0


def test_bytes_per_row_and_errors(gguf):
    assert gq.bytes_per_row("Q4_K", 3584) == 14 * 144
    assert gq.bytes_per_row("q8_0", 576) == 18 * 34
    assert gq.bytes_per_row(gguf.GGMLQuantizationType.Q6_K, 256) == 210
    assert gq.bytes_per_row(3, 64) == 40  # GGML id of Q4_1
    with pytest.raises(ValueError, match="Q4_K block size 256"):
        gq.bytes_per_row("Q4_K", 576)
    with pytest.raises(ValueError, match="IQ2_XS.*not supported"):
        gq.qtype_name("IQ2_XS")
    with pytest.raises(ValueError, match="expected"):
        gq.gguf_linear(torch.randn(1, 64), torch.zeros(4, 30, dtype=torch.uint8), "Q4_0", 4, 64)
    with pytest.raises(ValueError, match="features"):
        gq.gguf_linear(torch.randn(1, 32), torch.zeros(4, 36, dtype=torch.uint8), "Q4_0", 4, 64)


def _case(name, n, k, device, seed=0):
    packed = gq.random_packed(name, n, k, device, seed=seed)
    return packed, gq.dequantize(packed, name, k)


@pytest.mark.parametrize("name", QTYPES)
def test_triton_dequantize_exact_interpreter(kern, name):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    k = 512 if name.endswith("_K") else 288  # 9 legacy blocks: a partial 256-chunk
    packed, ref = _case(name, 12, k, device)
    got = gq.gguf_dequantize(packed, name, 12, k, dtype=torch.float32)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", QTYPES)
@pytest.mark.parametrize("m,fused_max_m", [(1, None), (3, None), (20, 64), (20, 0)])
def test_gguf_linear_interpreter(kern, name, m, fused_max_m):
    """GEMV (M=1), fused tl.dot (M=3; M=20 forced), dequantize + matmul (M=20 forced)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, k = 40, 512 if name.endswith("_K") else 288
    packed, w = _case(name, n, k, device, seed=m)
    x = torch.randn(2, m, k, device=device) if m == 20 else torch.randn(m, k, device=device)
    got = gq.gguf_linear(x, packed, name, n, k, fused_max_m=fused_max_m)
    ref = x.double() @ w.double().T
    assert got.shape == (*x.shape[:-1], n) and got.dtype == x.dtype
    err = (got.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, err


@pytest.mark.parametrize("name", ["Q8_0", "Q4_1", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("m,split", [(1, 2), (1, 3), (4, 3)])
def test_gguf_linear_split_k_interpreter(kern, name, m, split):
    """K split across programs (fp32 partial sums), including a split left without chunks."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, k = 24, 1024 if name.endswith("_K") else 544  # 4 or 3 chunks (17 legacy blocks)
    packed, w = _case(name, n, k, device, seed=split)
    x = torch.randn(m, k, device=device)
    got = gq.gguf_linear(x, packed, name, n, k, split_k=split)
    ref = x.double() @ w.double().T
    err = (got.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, err


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K"])
@pytest.mark.parametrize("split", [1, 3])
def test_gguf_grouped_gemv_interpreter(kern, monkeypatch, name, split):
    """The per-group-scale GEMV variant (off by default until measured on a GPU)."""
    monkeypatch.setattr(gq, "GROUPED_GEMV", True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, k = 24, 1024 if name.endswith("_K") else 544
    packed, w = _case(name, n, k, device, seed=split)
    x = torch.randn(1, k, device=device)
    got = gq.gguf_linear(x, packed, name, n, k, split_k=split)
    ref = x.double() @ w.double().T
    err = (got.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("grouped", [False, True])
def test_gguf_grouped_gemv_gpu(monkeypatch, grouped):
    monkeypatch.setattr(gq, "GROUPED_GEMV", grouped)
    for name in ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K"):
        packed, w = _case(name, 4096, 4096, "cuda")
        x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w.T
        got = gq.gguf_linear(x, packed, name, 4096, 4096)
        assert ((got.float() - ref).abs().max() / ref.abs().max()).item() < 1.5e-2, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", QTYPES)
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336)])
def test_gguf_linear_gpu(name, n, k):
    packed, w = _case(name, n, k, "cuda")
    for m in (1, 8, 64, 512):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        got = gq.gguf_linear(x, packed, name, n, k)
        ref = x.float() @ w.T
        err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1.5e-2, (m, err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", QTYPES)
def test_gguf_dequantize_gpu_exact(name):
    packed, w = _case(name, 4096, 4096, "cuda")
    assert torch.equal(gq.gguf_dequantize(packed, name, 4096, 4096, dtype=torch.float32), w)
    assert torch.equal(gq.gguf_dequantize(packed, name, 4096, 4096), w.bfloat16())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gguf_linear_cuda_graph():
    packed, w = _case("Q4_K", 1024, 1024, "cuda")
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, 1024, device="cuda", dtype=torch.bfloat16)
    gq.gguf_linear(x, packed, "Q4_K", 1024, 1024, out=out)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gq.gguf_linear(x, packed, "Q4_K", 1024, 1024, out=out)
    x.copy_(torch.randn_like(x))
    g.replay()
    ref = x.float() @ w.T
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 1.5e-2
