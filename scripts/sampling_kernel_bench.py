"""The sampling side of a decode step alone, on a GPU: penalties + logprobs' rank and top-k
over [B, vocab] float32 logits, the torch path against the Triton kernels (kernels/sampling.py).

    python scripts/sampling_kernel_bench.py [--batch-sizes 1,64] [--vocab 152064] [--output f.json]

Each timing (CUDA events, median of --iters) covers what the runner does on the device for a
step where every row asks logprobs=5 and all three penalties: log_softmax of the raw logits,
the packed counts (TokenHistory.counts' zero-fill and scatters over --history tokens a row),
the penalties, argmax, then the sampled token's logprob, rank and top-5.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphwise.runner.logits_processors import penalize_reference  # noqa: E402
from graphwise.runner.logprobs import sampled_logprobs  # noqa: E402


def _step(logits, history, prompt_len, rows, rep, pres, freq, use_triton, upload) -> None:
    vocab = logits.shape[1]
    raw = torch.log_softmax(logits, dim=-1)
    counts = torch.zeros((rows.shape[0], (vocab + 16) // 16 * 16), dtype=torch.int32,
                         device=logits.device)  # fmt: skip
    counts.scatter_(1, history, 1)
    gen = history[:, prompt_len:]
    counts.scatter_add_(1, gen, torch.full_like(gen, 2, dtype=torch.int32))
    if use_triton:
        from graphwise.kernels.sampling import apply_penalties_

        apply_penalties_(logits, rows, counts, rep, pres, freq)
    else:
        penalize_reference(logits, rows, counts, rep, pres, freq)
    tokens = logits.argmax(dim=-1)
    wanted = [(i, 5) for i in range(rows.shape[0])]
    sampled_logprobs(raw, tokens, wanted, upload, use_triton=use_triton)


def bench(batch: int, vocab: int, history_len: int, iters: int, use_triton: bool) -> float:
    from graphwise.runner.inputs import Uploader

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    base = torch.randn((batch, vocab), device=dev, generator=g)
    history = torch.randint(0, vocab, (batch, history_len), device=dev, generator=g)
    rows = torch.arange(batch, device=dev)
    rep = torch.full((batch,), 1.1, device=dev)
    pres = torch.full((batch,), 0.5, device=dev)
    freq = torch.full((batch,), 0.5, device=dev)
    upload = Uploader(dev)
    logits = base.clone()
    args = (logits, history, history_len // 2, rows, rep, pres, freq, use_triton, upload)
    for _ in range(3):  # compile, warm the allocator
        _step(*args)
    times = []
    for _ in range(iters):
        logits.copy_(base)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _step(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--history", type=int, default=160, help="tokens so far per row")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    rows = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        torch_ms = bench(b, args.vocab, args.history, args.iters, use_triton=False)
        triton_ms = bench(b, args.vocab, args.history, args.iters, use_triton=True)
        rows.append({"batch": b, "vocab": args.vocab, "torch_ms": torch_ms,
                     "triton_ms": triton_ms})  # fmt: skip
        print(f"batch {b:4d}: torch {torch_ms:.3f} ms, triton {triton_ms:.3f} ms "
              f"(sampling side of one step, device time)")  # fmt: skip
    if args.output:
        info = {"device": torch.cuda.get_device_name(), "rows": rows}
        Path(args.output).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
