"""Pipeline micro-batches: the scheduler's side of keeping several batches in flight.

With pipeline parallelism and one batch in flight, stage 1 waits while stage 0 computes and
stage 0 waits while stage 1 does: each GPU is busy 1/p of the time. With m batches in flight
(`EngineConfig.pipeline_micro_batches`, default p with async scheduling) the stages overlap:
stage 0 computes batch B while stage 1 computes batch A, then A's tokens are sampled and its
sequences form the next batch while B is in stage 1 (vLLM's batch queue, SGLang's PP loop).

What the scheduler does differently (`Scheduler(micro_batches=m)`):

- **Locked sequences.** A sequence with a token in flight (`num_placeholders > 0`) waits: its
  next input is that token, which exists only once its batch has passed every stage and been
  sampled. A prompt whose last chunk was not reached yet is not locked: its next chunk may go in
  the next batch (its inputs are known).
- **Disjoint, balanced batches.** Each batch takes at most `seq_cap` sequences: the active ones
  (running, held seats, waiting; at most `max_num_seqs`) spread over the m batches rather than
  all landing in the first and leaving the others empty.
- **Finished ids held back.** A request that ended while a batch holding it is still in flight
  is forgotten by the runner only once that batch has resolved (the runner samples it then, with
  the request's state); until then its id cannot be reused (`held_ids`).

Why a batch may run before the batches ahead of it resolve: every stage runs batches in the
order they were launched, so whatever KV a batch reads (its own earlier chunks, a prefix-cache
hit, a block freed by an abort and handed out again) was written, on that stage, by an earlier
batch or is overwritten by this one, exactly as with one GPU running steps in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graphwise.engine.sequence import Sequence


class MicroBatchPolicy:
    """How the scheduler forms one of `num_batches` batches in flight."""

    def __init__(self, num_batches: int, max_num_seqs: int) -> None:
        if num_batches < 2:
            raise ValueError(f"micro-batching needs at least 2 batches, got {num_batches}")
        self.num_batches = num_batches
        self.max_num_seqs = max_num_seqs

    def seq_cap(self, num_active: int) -> int:
        """The most sequences one batch takes: the active ones (at most max_num_seqs) split
        evenly over the batches, rounding up (so that every active sequence has a batch)."""
        active = min(self.max_num_seqs, num_active)
        return max(1, -(-active // self.num_batches))

    @staticmethod
    def locked(seq: Sequence) -> bool:
        """Its next input is a token still in flight (sampled by a batch not resolved yet)."""
        return seq.num_placeholders > 0

    @staticmethod
    def split_finished(finished: list[str], in_flight: set[str]) -> tuple[list[str], list[str]]:
        """(forget now, hold back): ids a batch in flight still samples are held back."""
        now = [rid for rid in finished if rid not in in_flight]
        if len(now) == len(finished):
            return finished, []
        return now, [rid for rid in finished if rid in in_flight]
