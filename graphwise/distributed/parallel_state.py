"""Who this process is in a tensor/pipeline-parallel group, and the collectives layers call.

Rank layout: world rank = pp_rank * tp_size + tp_rank, so a tensor-parallel group is a run of
consecutive ranks (on one host: the GPUs that share NVLink). Three kinds of process group:

- the default (world) group, on the device backend (NCCL on CUDA, gloo on CPU): pipeline
  point-to-point sends of hidden states;
- one TP group per pipeline stage, on the device backend: the all-reduces inside the forward;
- one control group over every rank, always gloo, with a long timeout: rank 0 broadcasts each
  step's description through it, and idle workers wait on it for as long as the engine idles.
  A worker receives on it in a thread of its own (executor/worker.py), so that rank 0's next
  step reaches a pipeline stage that is still computing the previous one (micro-batches);
- one sync group over every rank, gloo: what the ranks' runners exchange inside a call (rank 0's
  measurements, `agree`; every rank's result, gathered to rank 0). Apart from the control
  group, since a worker's receiving thread may wait on that one meanwhile.

Layers learn their shard when they are built: they read `current()`, which is the single-device
context (rank 0 of 1) unless a model is being built inside `building(ctx)`. So a model built
anywhere else is exactly the single-device model, and a TP=1 engine never calls a collective.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int) -> int:
        """World rank of this rank's TP peer in pipeline stage `pp_rank`."""
        return pp_rank * self.tp_size + self.tp_rank

    @classmethod
    def from_rank(cls, rank: int, tp_size: int, pp_size: int) -> ParallelContext:
        return cls(
            tp_rank=rank % tp_size, tp_size=tp_size, pp_rank=rank // tp_size, pp_size=pp_size
        )


SINGLE = ParallelContext()
_building: ParallelContext | None = None


def current() -> ParallelContext:
    """The shard the model under construction belongs to (single-device outside `building`)."""
    return _building if _building is not None else SINGLE


@contextlib.contextmanager
def building(ctx: ParallelContext) -> Iterator[None]:
    global _building
    previous, _building = _building, ctx
    try:
        yield
    finally:
        _building = previous


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """[start, end) of the decoder layers pipeline stage `pp_rank` runs: an even split, the
    remainder going to the last stages (stage 0 also holds the embedding and the LM head)."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + max(0, pp_rank - (pp_size - extra))
    return start, start + base + (1 if pp_rank >= pp_size - extra else 0)


def kv_head_part(num_kv_heads: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """(index, count): the rank holds KV-head block `index` of `count`. With fewer KV heads than
    ranks each head is replicated on tp / num_kv_heads consecutive ranks."""
    if num_kv_heads >= tp_size:
        return tp_rank, tp_size
    return tp_rank // (tp_size // num_kv_heads), num_kv_heads


# ---- process groups (one parallel engine per process) -------------------------------------
@dataclass
class _Groups:
    ctx: ParallelContext
    tp_group: Any
    control_group: Any
    sync_group: Any
    tp_ranks: list[int]


_groups: _Groups | None = None
CONTROL_TIMEOUT = datetime.timedelta(days=30)  # idle workers wait on the control group


def is_initialized() -> bool:
    return _groups is not None


def initialize(
    ctx: ParallelContext,
    backend: str,
    timeout: datetime.timedelta,
    store: Any = None,
    init_method: str | None = None,
    device: torch.device | None = None,
) -> None:
    """Join the world group and build the TP and control groups (every rank calls this)."""
    global _groups
    if _groups is not None or dist.is_initialized():
        raise RuntimeError(
            "this process already belongs to a torch.distributed group: one tensor/pipeline-"
            "parallel engine per process (shut the other one down first)"
        )
    kwargs: dict[str, Any] = {}
    if store is not None:
        kwargs["store"] = store
    else:
        kwargs["init_method"] = init_method or "env://"
    if backend == "nccl" and device is not None:
        kwargs["device_id"] = device
    dist.init_process_group(
        backend, rank=ctx.rank, world_size=ctx.world_size, timeout=timeout, **kwargs
    )
    tp_group = None
    tp_ranks: list[int] = []
    for pp in range(ctx.pp_size):  # every rank creates every group, in the same order
        ranks = list(range(pp * ctx.tp_size, (pp + 1) * ctx.tp_size))
        group = dist.new_group(ranks, timeout=timeout) if ctx.tp_size > 1 else None
        if pp == ctx.pp_rank:
            tp_group, tp_ranks = group, ranks
    everyone = list(range(ctx.world_size))
    control = dist.new_group(everyone, backend="gloo", timeout=CONTROL_TIMEOUT)
    sync = dist.new_group(everyone, backend="gloo", timeout=CONTROL_TIMEOUT)
    _groups = _Groups(ctx, tp_group, control, sync, tp_ranks)


def destroy() -> None:
    global _groups
    _groups = None
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def control_group() -> Any:
    assert _groups is not None, "parallel state is not initialized"
    return _groups.control_group


def sync_group() -> Any:
    assert _groups is not None, "parallel state is not initialized"
    return _groups.sync_group


def agree(value: Any) -> Any:
    """Rank 0's `value` on every rank (itself outside a parallel group). Start-up code that
    branches on a measurement calls this so that every rank takes the same branch."""
    if _groups is None or _groups.ctx.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_groups.sync_group)
    return box[0]


def agree_all(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank ([value] outside a parallel group)."""
    if _groups is None or _groups.ctx.world_size == 1:
        return [value]
    out: list[Any] = [None] * _groups.ctx.world_size
    dist.all_gather_object(out, value, group=_groups.sync_group)
    return out


# ---- collectives the layers call (only when their tp_size > 1) ----------------------------
def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the TP group, in place; a no-op outside a TP group."""
    if _groups is None or _groups.tp_group is None:
        return x
    dist.all_reduce(x, group=_groups.tp_group)
    return x


def gather_vocab_shards(logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Concatenate every TP rank's [N, V/tp] logits on TP rank 0 (which samples); others get None.
    Padding columns past `vocab_size` are dropped."""
    if _groups is None or _groups.tp_group is None:
        return logits[:, :vocab_size]
    logits = logits.contiguous()
    dst = _groups.tp_ranks[0]
    if _groups.ctx.tp_rank == 0:
        parts = [torch.empty_like(logits) for _ in _groups.tp_ranks]
        dist.gather(logits, parts, dst=dst, group=_groups.tp_group)
        return torch.cat(parts, dim=-1)[:, :vocab_size]
    dist.gather(logits, None, dst=dst, group=_groups.tp_group)
    return None
