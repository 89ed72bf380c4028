"""A synthetic decode step and a fair clock for it: what the graph policy and `explain` time.

The step is padding-free (`batch_size` sequences of `context_len` tokens each, in their own KV
blocks) and leaves out the host-side work eager and graph share (scheduling, input upload,
detokenizing), so the comparison is the forward itself: eager launches against graph replay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from graphwise.layers.attention import AttentionMetadata
from graphwise.runner.inputs import StepInputs

if TYPE_CHECKING:
    from graphwise.runner.cuda_graph import CudaGraphRunner
    from graphwise.runner.model_runner import ModelRunner

WARMUP_STEPS = 2
TIMED_STEPS = 10  # per mode, at most (fewer when a step is slow)


def synthetic_decode_inputs(runner: ModelRunner, batch_size: int, context_len: int) -> StepInputs:
    """A padding-free decode step: `batch_size` sequences, each with `context_len` tokens in its
    own KV blocks (the first batch_size x ceil(context_len / block_size) blocks of the cache),
    each adding its token at position context_len - 1."""
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
        sampled=[],
    )


def synthetic_intermediate(
    runner: ModelRunner, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What a pipeline stage after the first takes from the one before: (hidden, residual) of
    modest values (None on the first stage)."""
    if runner.parallel.is_first_stage:
        return None
    H = runner.model_config.hidden_size
    gen = torch.Generator(device=runner.device).manual_seed(0)
    x = torch.randn(2, batch_size, H, generator=gen, device=runner.device).to(runner.dtype)
    return x[0], x[1]


def decode_step(
    runner: ModelRunner,
    inputs: StepInputs,
    graphs: CudaGraphRunner | None = None,
    intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """One decode step without the host-side parts both modes share (scheduling, input upload,
    detokenizing): forward (eager, or graph replay when `graphs` is given), LM head, argmax.
    On a pipeline stage: its own layers (`intermediate` feeds a stage after the first), and
    the LM head on stage 0 only. Call under torch.inference_mode()."""
    if graphs is not None:
        out = graphs.replay(inputs, intermediate)
    else:
        out = runner.run_model(inputs.input_ids, inputs.positions, inputs.meta, intermediate)
    if not runner.parallel.is_first_stage:
        return None
    hidden = out[0] if isinstance(out, tuple) else out
    logits = runner.model.compute_logits(hidden[inputs.logits_indices])  # type: ignore[operator]
    return None if logits is None else logits.argmax(dim=-1)  # None: a TP rank other than 0


def time_steps(
    steps: Mapping[str, Callable[[], object]],
    device: torch.device,
    warmup: int = WARMUP_STEPS,
    reps: int = TIMED_STEPS,
    budget_s: float | None = None,
    enqueue_out: dict[str, list[float]] | None = None,
    agree: Callable[[int], int] = lambda reps: reps,
) -> dict[str, list[float]]:
    """Milliseconds per call of each step, the steps alternating, the device idle before each
    call (like the engine's steps, which end in a host sync). CUDA events on CUDA, wall time
    otherwise. With `budget_s`, fewer repetitions (at least 3) when one round is slow. With
    `enqueue_out`, also the host time of each same call up to its return, before the sync (the
    CPU enqueue time): pairing the two per call keeps host-speed drift out of their comparison.
    `agree` settles the number of repetitions across tensor-parallel ranks (each must run the
    same steps: their collectives pair up)."""
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
            reps = agree(max(3, min(reps, int(budget_s / max(round_s, 1e-9)))))
    return out
