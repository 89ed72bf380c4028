"""Passes through a pipeline of stages (pipeline parallelism).

Hidden states and the residual go stage to stage by point-to-point sends; the last stage sends
the rows to be sampled back to stage 0, which holds the LM head.

- `pipeline_forward`: one batch in flight. Stage 0 waits for the last stage's rows before its
  step returns, so while one stage computes the others wait.
- `launch_stage` / `PendingRows`: pipeline micro-batches (engine/microbatch.py). Each stage
  computes its layers and passes the result on without waiting for the receiver; stage 0 posts
  the receive of the rows and returns, and waits for them only when the batch is finished
  (`ModelRunner.finish_step`), after it has launched the next batch. Every pair of stages sees
  its sends and receives in the same order (stage 0: send batch i, receive batch i's rows; the
  last stage: receive batch i, send its rows), so they pair up under NCCL's in-order streams as
  well as under gloo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from graphwise.runner.inputs import StepInputs
    from graphwise.runner.model_runner import ModelRunner


def _stage(runner: ModelRunner, inputs: StepInputs) -> tuple[Any, bool]:
    """This stage's layers on the step (after receiving the previous stage's output)."""
    ctx = runner.parallel
    if ctx.is_first_stage:
        return runner.stage_forward(inputs)
    T = inputs.input_ids.shape[0]
    H = runner.model_config.hidden_size
    buf = torch.empty(2, T, H, dtype=runner.dtype, device=runner.device)
    dist.recv(buf, src=ctx.stage_rank(ctx.pp_rank - 1))
    return runner.stage_forward(inputs, (buf[0], buf[1]))


def pipeline_forward(runner: ModelRunner, inputs: StepInputs) -> tuple[torch.Tensor, bool]:
    """Stage 0 returns [T, H] hidden states of which the sampled rows (inputs.logits_indices)
    are filled; other stages return theirs. With whether this stage replayed a graph."""
    ctx = runner.parallel
    out, used_graph = _stage(runner, inputs)
    n = inputs.logits_indices.numel()
    if not ctx.is_last_stage:
        dist.send(torch.stack(out), dst=ctx.stage_rank(ctx.pp_rank + 1))
    elif n:
        dist.send(out[inputs.logits_indices].contiguous(), dst=ctx.stage_rank(0))
    if not ctx.is_first_stage:
        return (out if ctx.is_last_stage else out[0]), used_graph
    H = runner.model_config.hidden_size
    hidden = torch.empty(inputs.input_ids.shape[0], H, dtype=runner.dtype, device=runner.device)
    if n:
        rows = torch.empty(n, H, dtype=runner.dtype, device=runner.device)
        dist.recv(rows, src=ctx.stage_rank(ctx.pp_size - 1))
        hidden[inputs.logits_indices] = rows
    return hidden, used_graph


@dataclass
class PendingRows:
    """Stage 0's receive of a micro-batch's sampled rows [N, H] from the last stage."""

    rows: torch.Tensor
    work: Any  # the irecv's torch.distributed Work

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.rows


class PendingSends:
    """Sends in flight: their tensors stay referenced until the peer has them (an isend's
    buffer must not be freed or reused before it completes)."""

    def __init__(self) -> None:
        self._sends: list[tuple[Any, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
        self._sends.append((dist.isend(tensor, dst=dst), tensor))

    def wait_all(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []

    def __len__(self) -> int:
        return len(self._sends)


def launch_stage(
    runner: ModelRunner, inputs: StepInputs, sends: PendingSends
) -> tuple[PendingRows | None, bool]:
    """Run this stage's share of a micro-batch and pass it on without waiting for the peer.
    Stage 0 returns the posted receive of the rows to sample (None when none samples); a later
    stage returns None once its result is on its way. With whether this stage replayed a
    graph (the sent tensors are copies: the graph's output buffers are reused by the next)."""
    ctx = runner.parallel
    out, used_graph = _stage(runner, inputs)
    n = inputs.logits_indices.numel()
    if not ctx.is_last_stage:
        sends.send(torch.stack(out), ctx.stage_rank(ctx.pp_rank + 1))
    elif n:
        sends.send(out[inputs.logits_indices].contiguous(), ctx.stage_rank(0))
    if not ctx.is_first_stage or not n:
        return None, used_graph
    H = runner.model_config.hidden_size
    rows = torch.empty(n, H, dtype=runner.dtype, device=runner.device)
    work = dist.irecv(rows, src=ctx.stage_rank(ctx.pp_size - 1))
    return PendingRows(rows, work), used_graph
