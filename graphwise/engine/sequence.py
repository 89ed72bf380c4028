"""Sequence: one request's tokens, KV blocks and progress through the scheduler.

Only the scheduler (and the block manager it drives) changes a Sequence. The text, the
detokenizer's offsets and the output bookkeeping live in the output processor; the runner sees
rows of a `SchedulerOutput`, never a Sequence.
"""

from __future__ import annotations

import enum
import sys
import time
from typing import Any

from graphwise.core.step import PromptLogprobs
from graphwise.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        arrival_time: float | None = None,
        max_total_tokens: int = sys.maxsize,
        bad_words_ids: tuple[tuple[int, ...], ...] = (),
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt followed by the outputs known so far
        # Async scheduling: tokens sampled by a step still running on the GPU. They count in
        # num_tokens (the scheduler plans around them) but are not in token_ids yet; the newest
        # is row `pending_row` of the last launched step's sampled tokens.
        self.num_placeholders = 0
        self.pending_row = -1
        # Length at which the sequence stops for sure (max_tokens, max_model_len): the scheduler
        # does not give a step to a sequence whose pending token already reaches it.
        self.max_total_tokens = max_total_tokens
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.bad_words_ids = bad_words_ids  # params.bad_words as token sequences
        # Its structured-output constraint (engine/structured.py RequestGrammar), if any: the
        # scheduler admits it once compiled and advances its matcher with each token.
        self.grammar: Any = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        # Tokens whose KV is in the cache; the scheduler advances it, preemption resets it.
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit at first admission
        self.block_table: list[int] = []
        self.num_blocks_sent = 0  # leading entries of block_table the runner already holds
        self.block_hashes: list[int] = []  # hashes of this sequence's full blocks, in order
        self.num_registered_blocks = 0  # leading blocks the prefix cache has already seen
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        self.finished_time: float | None = None
        # Parallel sampling (n > 1): the samples that fork from this sequence once its prompt's
        # KV is computed (they wait here, in no queue), the seats the scheduler holds for them
        # meanwhile, and, on such a waiting sample, the sequence it forks from.
        self.forks: list[Sequence] = []
        self.num_reserved_seats = 0
        self.fork_parent: Sequence | None = None
        self.forked = False  # has shared blocks with a fork (copy-on-write may apply)
        # With prompt_logprobs: the entries so far (chunk by chunk), handed out with the first
        # output token.
        self.prompt_logprobs = (
            PromptLogprobs(0) if sampling_params.prompt_logprobs is not None else None
        )
        self.prompt_logprobs_sent = False
        # Speculative decoding (engine/ngram.py, runner/draft_model.py): whether this request
        # may get drafts, the drafts chosen for the step being described (n-gram: their ids;
        # draft model: how many the runner is to propose), and how many a step in flight
        # verifies (until it resolves the request is not scheduled: its length is unknown).
        self.speculate = False
        self.draft_token_ids: list[int] = []
        self.num_model_drafts = 0
        self.num_drafts_in_flight = 0
        self.token_array: Any = None  # engine/ngram.py TokenArray, made on the first proposal
        # Draft model: leading positions whose KV the draft model's cache holds (it computes
        # what the target computes, except the last draft of a verify step that accepted all).
        self.num_draft_computed = 0

    @property
    def num_tokens(self) -> int:
        """Tokens known plus tokens being sampled on the GPU (what scheduling counts)."""
        return len(self.token_ids) + self.num_placeholders

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs are asked for and not all computed yet: the prompt must be computed,
        not taken from the prefix cache (vLLM's choice too)."""
        pl = self.prompt_logprobs
        return pl is not None and len(pl) < self.num_prompt_tokens - 1

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_known_output_tokens(self) -> int:
        """Output tokens whose ids the host has (stop conditions use these)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)}, {self.status.value})"
        )
