"""One synchronous pass through a pipeline of stages (pipeline parallelism).

Hidden states and the residual go stage to stage by point-to-point sends; the last stage sends
the rows to be sampled back to stage 0, which holds the LM head. One batch is in flight (see
docs/parallel.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from graphwise.runner.inputs import StepInputs
    from graphwise.runner.model_runner import ModelRunner


def pipeline_forward(runner: ModelRunner, inputs: StepInputs) -> torch.Tensor:
    """Stage 0 returns [T, H] hidden states of which the sampled rows (inputs.logits_indices)
    are filled; other stages return theirs."""
    ctx = runner.parallel
    T = inputs.input_ids.shape[0]
    H = runner.model_config.hidden_size
    dtype, device = runner.dtype, runner.device
    if ctx.is_first_stage:
        out = runner.run_model(inputs.input_ids, inputs.positions, inputs.meta)
    else:
        buf = torch.empty(2, T, H, dtype=dtype, device=device)
        dist.recv(buf, src=ctx.stage_rank(ctx.pp_rank - 1))
        out = runner.run_model(
            inputs.input_ids, inputs.positions, inputs.meta, intermediate=(buf[0], buf[1])
        )
    n = inputs.logits_indices.numel()
    if not ctx.is_last_stage:
        dist.send(torch.stack(out), dst=ctx.stage_rank(ctx.pp_rank + 1))
    elif n:
        dist.send(out[inputs.logits_indices].contiguous(), dst=ctx.stage_rank(0))
    if not ctx.is_first_stage:
        return out if ctx.is_last_stage else out[0]
    hidden = torch.empty(T, H, dtype=dtype, device=device)
    if n:
        rows = torch.empty(n, H, dtype=dtype, device=device)
        dist.recv(rows, src=ctx.stage_rank(ctx.pp_size - 1))
        hidden[inputs.logits_indices] = rows
    return hidden
