import math
import sys

import torch
import triton

sys.path.insert(0, ".")
import torch.nn.functional as F

from graphwise.insight.system import cuda_graph_ms
from graphwise.kernels import (
    alloc_decode_workspace,
    choose_num_splits,
    decode_attention,
    extend_attention,
)

dev = torch.device("cuda")
print(torch.__version__, triton.__version__, torch.cuda.get_device_name())


def graph_time(fn, iters=20, reps=10):
    return cuda_graph_ms(fn, calls=iters, reps=reps) * 1e3  # us


MODE = sys.argv[1] if len(sys.argv) > 1 else "decode"
if MODE == "misc":
    from graphwise.kernels import fused_add_rmsnorm, rmsnorm, rope_qkv_, silu_and_mul, store_kv
    from graphwise.kernels import reference as R

    dt = torch.bfloat16
    for T in (1, 64, 4096):
        H = 4096
        x = torch.randn(T, H, dtype=dt, device=dev)
        r = torch.randn_like(x)
        w = torch.randn(H, dtype=dt, device=dev)
        o = torch.empty_like(x)
        t1 = graph_time(lambda: rmsnorm(x, w, 1e-6, out=o))
        t2 = graph_time(lambda: R.rmsnorm_ref(x, w, 1e-6))
        t3 = graph_time(lambda: fused_add_rmsnorm(x, r, w, 1e-6))
        print(
            f"rmsnorm T={T} triton {t1:.1f}us ({2 * x.numel() * 2 / t1 / 1e3:.0f} GB/s) torch {t2:.1f}us; fused_add {t3:.1f}us ({4 * x.numel() * 2 / t3 / 1e3:.0f} GB/s)"
        )
        I = 14336
        xi = torch.randn(T, 2 * I, dtype=dt, device=dev)
        oi = torch.empty(T, I, dtype=dt, device=dev)
        t1 = graph_time(lambda: silu_and_mul(xi, out=oi))
        t2 = graph_time(lambda: R.silu_and_mul_ref(xi))
        print(
            f"silu T={T} triton {t1:.1f}us ({3 * T * I * 2 / t1 / 1e3:.0f} GB/s) torch {t2:.1f}us"
        )
        hq, hkv, d = 32, 8, 128
        qkv = torch.randn(T, (hq + 2 * hkv) * d, dtype=dt, device=dev)
        pos = torch.randint(0, 4096, (T,), device=dev)
        cs = torch.randn(8192, d, device=dev)
        t1 = graph_time(lambda: rope_qkv_(qkv, pos, cs, hq, hkv, d))
        t2 = graph_time(lambda: R.rope_qkv_ref_(qkv, pos, cs, hq, hkv, d))
        print(
            f"rope T={T} triton {t1:.1f}us ({2 * T * (hq + hkv) * d * 2 / t1 / 1e3:.0f} GB/s) torch {t2:.1f}us"
        )
        kc = torch.randn(T // 16 + 8, 16, hkv, d, dtype=dt, device=dev)
        vc = torch.randn_like(kc)
        k = qkv[:, hq * d : (hq + hkv) * d].view(T, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(T, hkv, d)
        sl = torch.randperm(kc.shape[0] * 16, device=dev)[:T]
        t1 = graph_time(lambda: store_kv(k, v, kc, vc, sl))
        t2 = graph_time(
            lambda: (
                kc.view(-1, hkv, d).index_copy_(0, sl, k),
                vc.view(-1, hkv, d).index_copy_(0, sl, v),
            )
        )
        print(
            f"store_kv T={T} triton {t1:.1f}us ({4 * T * hkv * d * 2 / t1 / 1e3:.0f} GB/s) torch {t2:.1f}us"
        )
elif MODE == "decode":
    hq, hkv, d, page = 32, 8, 128, 16
    dtype = torch.bfloat16
    variants = [
        dict(block_n=64, num_warps=4, num_stages=3),
        dict(block_n=128, num_warps=4, num_stages=2),
    ]
    for b, ctx in [
        (1, 1024),
        (1, 8192),
        (4, 4096),
        (8, 2048),
        (16, 2048),
        (32, 2048),
        (64, 4096),
        (256, 4096),
    ]:
        max_blocks = math.ceil(ctx / page)
        nb = b * max_blocks
        kc = torch.randn(nb, page, hkv, d, dtype=dtype, device=dev)
        vc = torch.randn_like(kc)
        bt = torch.randperm(nb, device=dev).int().view(b, max_blocks)
        sl = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        q = torch.randn(b, hq, d, dtype=dtype, device=dev)
        out = torch.empty_like(q)
        gb = b * ctx * hkv * d * 2 * 2 / 1e9
        auto = choose_num_splits(b, hkv, ctx, 132)
        cands = sorted({1, auto, max(1, auto // 2), min(32, auto * 2)})
        line = f"B={b:4d} ctx={ctx:6d} auto_splits={auto:2d} |"
        res = []
        for v in variants:
            for s in cands:
                ws = alloc_decode_workspace(b, hq, d, s, dev)
                t = graph_time(
                    lambda: decode_attention(
                        q, kc, vc, bt, sl, d**-0.5, out=out, num_splits=s, workspace=ws, **v
                    )
                )
                res.append((t, s, v))
        res.sort(key=lambda r: r[0])
        default = [r for r in res if r[1] == auto and r[2] == variants[0]][0]
        print(
            f"{line} default {default[0]:7.1f}us {gb / default[0] * 1e6:6.0f} GB/s | best {res[0][0]:7.1f}us {gb / res[0][0] * 1e6:6.0f} GB/s splits={res[0][1]} {res[0][2]}",
            flush=True,
        )
        for r in res[:4]:
            print("      ", f"{r[0]:7.1f}us splits={r[1]} {r[2]}")
        del kc, vc
else:
    hq, hkv, d, page = 32, 8, 128, 16
    dtype = torch.bfloat16
    variants = [
        dict(block_m=64, block_n=64, num_warps=4, num_stages=2),
        dict(block_m=128, block_n=64, num_warps=8, num_stages=2),
    ]
    for b, qlen, prefix in [(1, 4096, 0), (8, 512, 0), (4, 256, 2048), (1, 16384, 0)]:
        ctx = qlen + prefix
        max_blocks = math.ceil(ctx / page)
        nb = b * max_blocks
        kc = torch.randn(nb, page, hkv, d, dtype=dtype, device=dev)
        vc = torch.randn_like(kc)
        bt = torch.arange(nb, device=dev).int().view(b, max_blocks)
        sl = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        cu = torch.arange(0, b + 1, device=dev, dtype=torch.int32) * qlen
        q = torch.randn(b * qlen, hq, d, dtype=dtype, device=dev)
        out = torch.empty_like(q)
        flops = 4 * b * hq * d * (qlen * prefix + qlen * qlen / 2)
        # dense SDPA baseline (flash, causal) on contiguous K/V
        kd = kc.view(b, -1, hkv, d)[:, :ctx].transpose(1, 2)
        vd = vc.view(b, -1, hkv, d)[:, :ctx].transpose(1, 2)
        qd = q.view(b, qlen, hq, d).transpose(1, 2)
        if prefix == 0:
            t_sdpa = graph_time(
                lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True),
                iters=5,
            )
            sd = f"sdpa {t_sdpa:8.1f}us {flops / t_sdpa / 1e6:6.0f} TF/s"
        else:
            sd = ""
        res = []
        for v in variants:
            t = graph_time(
                lambda: extend_attention(
                    q, kc, vc, cu, sl, bt, d**-0.5, out=out, max_q_len=qlen, **v
                ),
                iters=5,
            )
            res.append((t, v))
        print(
            f"B={b} qlen={qlen} prefix={prefix} {sd} | default {res[0][0]:8.1f}us {flops / res[0][0] / 1e6:6.0f} TF/s",
            flush=True,
        )
        for t, v in sorted(res, key=lambda r: r[0]):
            print("      ", f"{t:8.1f}us {flops / t / 1e6:6.0f} TF/s {v}")
