"""Scheduler: continuous batching with chunked prefill, a token budget and preemption.

The scheduler owns every request's state. `schedule()` picks the step and advances the state as
if it had run (computed tokens, a placeholder for each token being sampled); it describes the
step as data (`SchedulerOutput`). `update_from_output()` takes the runner's numbers back: it
appends the sampled tokens, registers full blocks with the prefix cache, applies the stop
conditions that tokens decide (stop token ids, EOS, max_tokens, max_model_len) and frees what
finished. Text-level stops (stop strings) are found by the output processor, which then calls
`finish_request`.

Every step each sequence gets some number of new tokens to compute: 1 for a sequence that is
decoding, a chunk of its prompt for one that is prefilling. Running sequences go first (oldest
first); waiting ones are admitted while the token budget, `max_num_seqs` and the KV pool allow.
When a running sequence needs a block and none is free, the newest running sequence is preempted:
its blocks are released and it re-enters the waiting queue to be recomputed later (its prefix
will usually still be in the cache).

Parallel sampling (n > 1) enters as one sequence carrying the other samples (`add(seq, forks)`).
Its prompt is computed once: the step that computes the last chunk forks the samples (they share
the prompt's blocks, block_manager.fork) and each samples from the same last position; from then
on each is a sequence of its own (decoded, preempted, finished on its own). While the prompt is
being computed the scheduler holds seats (of `max_num_seqs`) for the forks, so that others do not
take them; samples beyond `max_num_seqs - 1` wait as sequences of their own (the prefix cache
still shares the prompt's full blocks with them).
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from graphwise.config import SpeculativeConfig
from graphwise.core.step import (
    GrammarBitmask,
    ModelRunnerOutput,
    NewRequest,
    PromptLogprobs,
    SampleLogprobs,
    ScheduledRow,
    SchedulerOutput,
)
from graphwise.engine.block_manager import BlockManager
from graphwise.engine.microbatch import MicroBatchPolicy
from graphwise.engine.ngram import TokenArray, propose_ngram
from graphwise.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class RequestUpdate:
    """What one step did to one request (what the output processor turns into output)."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    error: str | None = None  # why the request failed (finish_reason "error")
    logprobs: list[SampleLogprobs] = field(default_factory=list)  # by new token, when asked
    # With prompt_logprobs: all of the prompt's, on the request's first update with a token.
    prompt_logprobs: PromptLogprobs | None = None


class SpecDecodeStats:
    """Speculative decoding counts (vLLM's spec_decode_* metrics): verify rows (`num_drafts`),
    draft tokens proposed and accepted, and acceptances by draft position."""

    def __init__(self, max_drafts: int) -> None:
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * max_drafts

    def add(self, num_drafts: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += accepted
        for j in range(accepted):
            self.accepted_per_pos[j] += 1


def can_speculate(seq: Sequence) -> bool:
    """Whether a request may get drafts. The ones asking for what verify steps do not compute
    yet decode plainly: prompt logprobs, structured outputs, penalties, logit bias, allowed
    token ids and bad words (their processors see the last position only), and n > 1 (decided
    in `Scheduler.add`). Sampled-token logprobs do speculate: the runner gives each emitted
    token the entry of the position that produced it (runner/logprobs.py plan_verify_rows)."""
    p = seq.sampling_params
    return not (
        p.prompt_logprobs is not None
        or seq.grammar is not None
        or p.penalized
        or p.logit_bias
        or p.allowed_token_ids
        or seq.bad_words_ids
    )


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        max_model_len: int = sys.maxsize,
        speculative: SpeculativeConfig | None = None,
        micro_batches: int = 1,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.max_model_len = max_model_len
        self.requests: dict[str, Sequence] = {}  # every unfinished request
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._step_ids = itertools.count()
        self._known_to_runner: set[str] = set()
        self._resend: set[str] = set()  # known, but their runner state is sent again
        self._finished_ids: list[str] = []  # since the last step, for the runner to forget
        # Per step not yet resolved: its sequences and those that sample, in row order. Tokens
        # come back to these objects, not to whatever request holds the id by then (an id can
        # be reused once its request ended, while a step still samples for the old one).
        self._in_flight: dict[int, tuple[list[Sequence], list[Sequence]]] = {}
        self._reserved_seats = 0  # held for the forks of running sequences (n > 1)
        self.speculative = speculative
        # The runner's draft model proposes (runner/draft_model.py): rows carry what its KV lacks.
        self.draft_model = speculative is not None and speculative.uses_draft_model
        self.spec_stats = SpecDecodeStats(
            speculative.num_speculative_tokens if speculative is not None else 0
        )
        # Pipeline micro-batches (engine/microbatch.py): None with one batch in flight.
        self.micro = MicroBatchPolicy(micro_batches, max_num_seqs) if micro_batches > 1 else None

    # ---- requests ---------------------------------------------------------------------
    def add(self, seq: Sequence, forks: list[Sequence] | tuple[Sequence, ...] = ()) -> None:
        """Queue a request; `forks` are the other samples of an n > 1 request (same prompt),
        forked from `seq` once its prompt is computed."""
        every = [seq, *forks]
        if len({s.request_id for s in every}) != len(every):
            raise ValueError("the samples of a request need distinct request ids")
        for s in every:
            if s.request_id in self.requests or s.request_id in self.held_ids():
                raise ValueError(f"request_id {s.request_id!r} is already in use")
            if s.prompt_token_ids != seq.prompt_token_ids:
                raise ValueError("the samples of a request share one prompt")
        for s in every:
            s.status = SequenceStatus.WAITING
            self.requests[s.request_id] = s
        for child in forks:
            child.fork_parent = seq
        seq.forks = list(forks)
        if self.speculative is not None and not forks:
            seq.speculate = can_speculate(seq)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def held_ids(self) -> set[str]:
        """Ids of ended requests that a micro-batch in flight still samples: the runner
        forgets them once it resolved, and they are not reused until then."""
        if self.micro is None or not self._finished_ids:
            return set()
        return set(self._finished_ids) & self._ids_in_flight()

    def _ids_in_flight(self) -> set[str]:
        return {s.request_id for seqs, _ in self._in_flight.values() for s in seqs}

    def finish_request(
        self, request_id: str, reason: str, stop_reason: int | str | None = None
    ) -> bool:
        """End a request now (abort, a stop string, a failure): its blocks are freed at once.
        A token a step in flight is still sampling for it is dropped with its KV. False if it
        is not (or no longer) here."""
        seq = self.requests.get(request_id)
        if seq is None:
            return False
        self._finish(seq, reason, stop_reason)
        return True

    def _finish(
        self, seq: Sequence, reason: str, stop_reason: int | str | None = None
    ) -> list[Sequence]:
        """Returns the samples still waiting to fork from `seq` (n > 1): they end with it (only
        an abort or a failure ends a sequence before its prompt is computed)."""
        if seq.fork_parent is not None:  # a sample not forked yet
            self._drop_fork(seq)
        elif seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release_seats(seq)
        orphans, seq.forks = seq.forks, []
        for child in orphans:
            child.fork_parent = None
        self.block_manager.release(seq)
        seq.num_placeholders = seq.num_drafts_in_flight = 0
        seq.num_computed_tokens = min(seq.num_computed_tokens, len(seq.token_ids))
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.finished_time = time.monotonic()
        del self.requests[seq.request_id]
        if seq.request_id in self._known_to_runner:
            self._known_to_runner.discard(seq.request_id)
            self._finished_ids.append(seq.request_id)
        for child in orphans:
            self._finish(child, reason, stop_reason)
        return orphans

    def _drop_fork(self, child: Sequence) -> None:
        parent = child.fork_parent
        assert parent is not None
        parent.forks.remove(child)
        child.fork_parent = None
        if parent.num_reserved_seats > len(parent.forks):
            parent.num_reserved_seats -= 1
            self._reserved_seats -= 1

    def _release_seats(self, seq: Sequence) -> None:
        self._reserved_seats -= seq.num_reserved_seats
        seq.num_reserved_seats = 0

    def _preempt(self, seq: Sequence) -> None:
        self._release_seats(seq)  # its forks wait with it; seats are held again on admission
        self.block_manager.release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- one step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        picked: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        micro = self.micro
        cap = sys.maxsize  # sequences in this batch (micro-batches: a share of the active)
        if micro is not None:
            cap = micro.seq_cap(len(self.running) + self._reserved_seats + len(self.waiting))

        # 1. Running sequences, oldest first; the newest is the first to give way.
        i = 0
        while i < len(self.running) and budget > 0 and len(picked) < cap:
            seq = self.running[i]
            if micro is not None and micro.locked(seq):
                i += 1  # its next input is a token another micro-batch is still computing
                continue
            if seq.num_tokens >= seq.max_total_tokens:
                # Its pending token is its last (length limit): it finishes when that resolves.
                i += 1
                continue
            if seq.speculate:
                if seq.num_placeholders:
                    # It waits for its previous token (async scheduling): drafts are proposed
                    # from known tokens, and a verify step's length is only known once resolved.
                    i += 1
                    continue
                n = self._schedule_drafts(seq, budget)
                if n:
                    picked.append((seq, n))
                    budget -= n
                    i += 1
                    continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.allocate_slots(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                picked.append((seq, n))
                budget -= n
                i += 1

        # 2. Waiting sequences, in arrival order, unless this step already had to preempt. One
        # whose grammar is still compiling waits without holding up those behind it.
        w = 0
        while (
            w < len(self.waiting)
            and not preempted
            and budget > 0
            and len(self.running) + self._reserved_seats < self.max_num_seqs
            and len(picked) < cap
        ):
            seq = self.waiting[w]
            if (
                (seq.grammar is not None and not seq.grammar.ready)
                or seq.num_drafts_in_flight
                or (micro is not None and micro.locked(seq))
            ):
                # (preempted while a step verifies its drafts, or with a token in another
                # micro-batch: it waits for that step)
                w += 1
                continue
            seats = min(len(seq.forks), self.max_num_seqs - 1)  # for its samples (n > 1)
            if len(self.running) + self._reserved_seats + 1 + seats > self.max_num_seqs:
                break
            cached = [] if seq.needs_prompt_logprobs else bm.find_cached_prefix(seq)
            num_cached = len(cached) * bm.block_size
            remaining = seq.num_tokens - num_cached
            if remaining > budget and not self.enable_chunked_prefill:
                break
            n = min(remaining, budget)
            if not bm.can_admit(seq, cached, num_cached + n):
                break
            del self.waiting[w]
            seq.num_reserved_seats = seats
            self._reserved_seats += seats
            bm.admit(seq, cached)
            seq.num_draft_computed = num_cached  # a cached block holds the draft's KV too
            ok = bm.allocate_slots(seq, num_cached + n)
            assert ok, "can_admit promised room"
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
                seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            picked.append((seq, n))
            budget -= n
        return self._describe(picked, preempted)

    def _schedule_drafts(self, seq: Sequence, budget: int) -> int:
        """Propose drafts for a decoding sequence and make room for them; the row's token
        count (1 + drafts), or 0 to schedule it plainly (no drafts, or no room for them)."""
        spec = self.speculative
        assert spec is not None
        known = len(seq.token_ids)
        if seq.num_computed_tokens != known - 1:
            return 0  # prefilling (chunked prefill: drafts go on decode rows only)
        if seq.num_known_output_tokens < seq.sampling_params.min_tokens:
            return 0  # its stop tokens are still banned, position by position
        # Never past max_tokens / max_model_len: the drafts and the token after them fit.
        k = min(spec.num_speculative_tokens, budget - 1, seq.max_total_tokens - known - 1)
        if k <= 0:
            return 0
        if self.draft_model:  # the runner's draft model proposes k tokens in the step
            if not self.block_manager.allocate_slots(seq, known + k):
                return 0
            seq.num_model_drafts = k
            return 1 + k
        if seq.token_array is None:
            seq.token_array = TokenArray()
        tokens = seq.token_array.sync(seq.token_ids)
        drafts = propose_ngram(tokens, spec.prompt_lookup_max, spec.prompt_lookup_min, k)
        if not drafts:
            return 0
        if not self.block_manager.allocate_slots(seq, known + len(drafts)):
            return 0  # no room for the drafts: decode plainly (and preempt only for that)
        seq.draft_token_ids = drafts
        return 1 + len(drafts)

    def _describe(
        self, picked: list[tuple[Sequence, int]], preempted: list[Sequence]
    ) -> SchedulerOutput:
        """The step as data, then the state advanced as if it ran."""
        out = SchedulerOutput(
            step_id=next(self._step_ids),
            preempted_request_ids=[s.request_id for s in preempted],
        )
        if not picked:  # nothing runs: the runner hears of finished requests with the next step
            return out
        out.finished_request_ids, self._finished_ids = self._finished_ids, []
        if self.micro is not None and out.finished_request_ids:
            out.finished_request_ids, self._finished_ids = self.micro.split_finished(
                out.finished_request_ids, self._ids_in_flight()
            )
        if self.block_manager.copies:
            out.block_copies = self.block_manager.take_copies()
        sampled: list[Sequence] = []
        forked: list[Sequence] = []
        grammar_rows: list[int] = []
        for seq, n in picked:
            c, known = seq.num_computed_tokens, len(seq.token_ids)
            if seq.draft_token_ids or seq.num_model_drafts:  # [last token, drafts]: verified
                self._verify_row(out, seq)
                sampled.append(seq)
                continue
            if c + n <= known:
                ids, pending = seq.token_ids[c : c + n], -1
            else:  # the last input is being sampled by the step launched before this one
                if c + n != known + 1 or seq.num_placeholders != 1:
                    raise RuntimeError(f"{seq!r}: only its newest token may be pending")
                ids, pending = seq.token_ids[c:known], seq.pending_row
            sample = c + n == seq.num_tokens
            p = seq.sampling_params
            if seq.request_id not in self._known_to_runner or seq.request_id in self._resend:
                self._send_state(out, seq)
            out.rows.append(
                ScheduledRow(
                    request_id=seq.request_id,
                    num_computed_tokens=c,
                    num_new_tokens=n,
                    token_ids=ids,
                    pending_row=pending,
                    new_block_ids=seq.block_table[seq.num_blocks_sent :],
                    reset_block_table=seq.num_blocks_sent == 0,
                    sample=sample,
                    # a grammar decides when its output may end: no min_tokens ban against it
                    ban_stop_tokens=sample
                    and seq.num_output_tokens < p.min_tokens
                    and seq.grammar is None,
                    draft_catch_up=self._draft_catch_up(seq),
                )
            )
            seq.num_blocks_sent = len(seq.block_table)
            out.num_prefill_tokens += max(0, min(n, seq.num_prompt_tokens - c))
            if sample:
                if seq.grammar is not None:
                    grammar_rows.append(len(sampled))
                sampled.append(seq)
                if seq.forks:  # n > 1: its samples sample right after it
                    children = self._fork_rows(out, seq, c + n)
                    for child in children:
                        if child.grammar is not None:
                            grammar_rows.append(len(sampled))
                        sampled.append(child)
                    forked.extend(children)
        if grammar_rows:
            out.grammar = GrammarBitmask(grammar_rows)
        for seq, n in picked:
            seq.num_computed_tokens += n
            out.num_context_tokens += seq.num_computed_tokens
            if self.draft_model:  # it computes the row too, but not a verify row's last draft
                seq.num_draft_computed = seq.num_computed_tokens - bool(seq.num_drafts_in_flight)
        for row, seq in enumerate(sampled):
            seq.num_placeholders += 1
            seq.pending_row = row
        seqs = [seq for seq, _ in picked]
        if forked:
            seqs += forked
        self._in_flight[out.step_id] = (seqs, sampled)
        return out

    def _verify_row(self, out: SchedulerOutput, seq: Sequence) -> None:
        """The row of a decoding sequence with drafts: its last token and the drafts (n-gram:
        known here; draft model: proposed by the runner in the step), all computed; the
        runner answers with the accepted drafts and the token after them."""
        c = seq.num_computed_tokens
        drafts, seq.draft_token_ids = seq.draft_token_ids, []
        k, seq.num_model_drafts = len(drafts) or seq.num_model_drafts, 0
        if seq.request_id not in self._known_to_runner or seq.request_id in self._resend:
            self._send_state(out, seq)
        out.rows.append(
            ScheduledRow(
                request_id=seq.request_id,
                num_computed_tokens=c,
                num_new_tokens=1 + k,
                token_ids=[seq.token_ids[c], *drafts],
                new_block_ids=seq.block_table[seq.num_blocks_sent :],
                reset_block_table=seq.num_blocks_sent == 0,
                sample=True,
                num_draft_tokens=k,
                propose=not drafts,
                draft_catch_up=self._draft_catch_up(seq),
            )
        )
        seq.num_blocks_sent = len(seq.block_table)
        seq.num_drafts_in_flight = k
        out.num_draft_tokens += k

    def _draft_catch_up(self, seq: Sequence) -> list[int]:
        """The tokens before the row's first whose KV the draft model lacks (none without a
        draft model, and almost always none with one: see runner/draft_model.py)."""
        if not self.draft_model or seq.num_draft_computed >= seq.num_computed_tokens:
            return []
        return seq.token_ids[seq.num_draft_computed : seq.num_computed_tokens]

    def _fork_rows(self, out: SchedulerOutput, seq: Sequence, num_computed: int) -> list[Sequence]:
        """Fork `seq`'s samples (its prompt is computed by this step) and add their rows, right
        after its own: no new tokens, sampled from its last position."""
        forked = self._fork(seq, num_computed)
        for child in forked:
            self._send_state(out, child)
            out.rows.append(
                ScheduledRow(
                    request_id=child.request_id,
                    num_computed_tokens=num_computed,
                    num_new_tokens=0,
                    token_ids=[],
                    new_block_ids=list(child.block_table),
                    reset_block_table=True,
                    sample=True,
                    ban_stop_tokens=child.sampling_params.min_tokens > 0,
                    fork_of=seq.request_id,
                )
            )
            child.num_blocks_sent = len(child.block_table)
        return forked

    def _send_state(self, out: SchedulerOutput, seq: Sequence) -> None:
        """The request's parameters, for the runner to keep (the first time it sees the
        request, or again after a failed step)."""
        p = seq.sampling_params
        banned: tuple[int, ...] = ()
        if p.min_tokens:
            banned = tuple(sorted(set(p.stop_token_ids or ()) | seq.eos_token_ids))
        # The prompt rides along only for prompt logprobs: a chunk's last position scores the
        # next chunk's first token.
        prompt = tuple(seq.prompt_token_ids) if p.prompt_logprobs is not None else ()
        out.new_requests.append(
            NewRequest(seq.request_id, p, banned, seq.num_prompt_tokens, seq.bad_words_ids, prompt)
        )
        self._known_to_runner.add(seq.request_id)
        self._resend.discard(seq.request_id)

    def _fork(self, seq: Sequence, num_computed: int) -> list[Sequence]:
        """Fork the samples waiting on `seq`, whose prompt this step completes: they share its
        blocks and run from now on. Those beyond the seats held for them wait as sequences of
        their own."""
        self._release_seats(seq)
        seats = max(0, self.max_num_seqs - len(self.running) - self._reserved_seats)
        children, rest = seq.forks[:seats], seq.forks[seats:]
        seq.forks = []
        for child in children + rest:
            child.fork_parent = None
        for child in reversed(rest):
            self.waiting.appendleft(child)
        for child in children:
            # Its grammar shares the parent's compile, done by now: `ready` makes its matcher.
            if child.grammar is not None and not child.grammar.ready:
                raise RuntimeError(f"{child!r}: its grammar is not compiled at the fork")
            self.block_manager.fork(seq, child)
            child.num_computed_tokens = child.num_draft_computed = num_computed
            child.status = SequenceStatus.RUNNING
            child.first_scheduled_time = seq.first_scheduled_time
            child.num_cached_tokens = seq.num_cached_tokens
            self.running.append(child)
        return children

    def step_grammars(self, step: SchedulerOutput) -> tuple[list, bool]:
        """The grammars of a step's constrained rows (None for a request that has ended), and
        whether any of them still waits for a token the previous step is sampling (then its
        mask can only be filled once that step is resolved)."""
        assert step.grammar is not None
        _, sampled = self._in_flight[step.step_id]
        seqs = [sampled[i] for i in step.grammar.rows]
        grammars = [None if s.is_finished else s.grammar for s in seqs]
        waits = any(not s.is_finished and s.num_placeholders > 1 for s in seqs)
        return grammars, waits

    def update_from_output(
        self, step: SchedulerOutput, output: ModelRunnerOutput
    ) -> list[RequestUpdate]:
        """Take a step's sampled tokens: append, cache full blocks, apply the token-decided stop
        conditions, free what finished. Returns one update per request that got a token or
        failed (a request finished or aborted while the step ran gets nothing)."""
        seqs, sampled = self._in_flight.pop(step.step_id)
        if [s.request_id for s in sampled] != output.req_ids:
            raise RuntimeError(f"step {step.step_id}: the runner sampled other rows than planned")
        if output.prompt_logprobs:
            by_id = {seq.request_id: seq for seq in seqs}
            for rid, part in output.prompt_logprobs.items():
                seq = by_id[rid]
                # A prompt recomputed after a preemption is not reported twice.
                if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
                    seq.prompt_logprobs.extend(part)
        got: list[tuple[Sequence, list[int], list[SampleLogprobs], tuple | None]] = []
        logprobs = output.logprobs or [None] * len(sampled)
        spec = output.spec_token_ids
        spec_lps = output.spec_logprobs
        for i, (seq, token, lp) in enumerate(
            zip(sampled, output.sampled_token_ids, logprobs, strict=True)
        ):
            if seq.is_finished or seq.request_id in output.errors:
                continue
            seq.num_placeholders -= 1
            if seq.num_drafts_in_flight:
                assert spec is not None, "a verify step came back without its tokens"
                kept, stop = self._take_verified(seq, spec[i])
                lps = spec_lps[i] if spec_lps is not None else None
                got.append((seq, kept, [] if lps is None else lps[: len(kept)], stop))
                continue
            seq.token_ids.append(token)
            got.append((seq, [token], [] if lp is None else [lp], None))
        for seq in seqs:  # their KV is written now: the prefix cache may hand it out
            if not seq.is_finished:
                self.block_manager.cache_full_blocks(seq)
        updates = [
            update
            for seq in seqs
            if seq.request_id in output.errors and not seq.is_finished
            for update in self._fail(seq, output.errors[seq.request_id])
        ]
        for seq, tokens, lp, checked in got:
            if seq.is_finished:
                continue
            token = tokens[-1]
            if seq.grammar is not None and not seq.grammar.accept(token):
                updates.extend(  # (_fail ends the samples waiting on it too)
                    self._fail(seq, f"token {token} does not fit the structured-output grammar")
                )
                continue
            reason, stop = checked if checked is not None else self._check_stop(seq, token)
            if reason is None and seq.grammar is not None and seq.grammar.is_terminated:
                reason = "stop"  # the constraint is complete
            update = RequestUpdate(
                seq.request_id,
                tokens,
                reason,
                stop,
                seq.num_cached_tokens,
                seq.first_scheduled_time,
                logprobs=lp,
            )
            if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
                update.prompt_logprobs = seq.prompt_logprobs
                seq.prompt_logprobs_sent = True
            if reason is not None:
                self._finish(seq, reason, stop)
            updates.append(update)
        return updates

    def _take_verified(
        self, seq: Sequence, tokens: list[int]
    ) -> tuple[list[int], tuple[str | None, int | None]]:
        """A verify row's tokens (accepted drafts, then the target's): roll the KV of rejected
        drafts back (their slots are recomputed, their blocks freed), then append the tokens
        up to the first that stops the request. Returns those and the stop."""
        num_drafts, seq.num_drafts_in_flight = seq.num_drafts_in_flight, 0
        accepted = len(tokens) - 1
        self.spec_stats.add(num_drafts, accepted)
        if seq.status == SequenceStatus.RUNNING:  # (preempted meanwhile: nothing is held)
            # The step computed the last token and every draft; only the accepted ones' KV is
            # real. The token after them is new: the next step computes it.
            seq.num_computed_tokens -= num_drafts - accepted
            self.block_manager.trim(seq, seq.num_computed_tokens + 1)
            # The draft model's KV past the accepted tokens is a rejected draft's (if any).
            seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed_tokens)
        kept: list[int] = []
        for token in tokens:
            seq.token_ids.append(token)
            kept.append(token)
            reason, stop = self._check_stop(seq, token)
            if reason is not None:
                return kept, (reason, stop)  # what follows a stop is dropped
        return kept, (None, None)

    def _check_stop(self, seq: Sequence, token: int) -> tuple[str | None, int | None]:
        p = seq.sampling_params
        if seq.num_known_output_tokens >= p.min_tokens:
            if token in (p.stop_token_ids or ()):
                return "stop", token
            if not p.ignore_eos and token in seq.eos_token_ids:
                return "stop", None
        if (p.max_tokens is not None and seq.num_known_output_tokens >= p.max_tokens) or len(
            seq.token_ids
        ) >= self.max_model_len:
            return "length", None
        return None, None

    def _fail(self, seq: Sequence, message: str) -> list[RequestUpdate]:
        """End a sequence with an error, and the samples still waiting to fork from it."""
        ended = [seq, *self._finish(seq, "error")]
        return [
            RequestUpdate(
                s.request_id,
                [],
                "error",
                None,
                s.num_cached_tokens,
                s.first_scheduled_time,
                error=message,
            )
            for s in ended
        ]

    def fail_requests(self, errors: dict[str, str]) -> list[RequestUpdate]:
        """End requests that cannot run (a step failed because of them)."""
        return [
            update
            for rid, message in errors.items()
            if rid in self.requests
            for update in self._fail(self.requests[rid], message)
        ]

    def fail_step(self, step: SchedulerOutput, message: str) -> list[RequestUpdate]:
        """A step whose output will never come (it failed and no row explains why): end the
        requests it ran."""
        seqs, _ = self._in_flight.pop(step.step_id, ([], []))
        return [
            update for seq in seqs if not seq.is_finished for update in self._fail(seq, message)
        ]

    def rollback(self, step: SchedulerOutput) -> None:
        """A step that failed before it ran: its requests go back to waiting and recompute their
        KV (their known tokens are intact; a token an earlier step is still sampling arrives as
        usual). Their runner state is sent again (keeping the seeded generators), in case the
        failure left it half-made, and so are the ids it was to forget."""
        seqs, sampled = self._in_flight.pop(step.step_id, ([], []))
        for seq in sampled:
            if not seq.is_finished:
                seq.num_placeholders -= 1
                seq.num_drafts_in_flight = 0  # its drafts were never verified
        for seq in seqs:
            if seq.is_finished:
                continue
            if seq in self.running:
                self.running.remove(seq)
                self._preempt(seq)
            self._resend.add(seq.request_id)
        self._finished_ids.extend(step.finished_request_ids)
