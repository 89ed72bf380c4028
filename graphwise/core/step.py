"""The step contract between the scheduler and the model runner: plain data, by row.

The scheduler decides what a step runs (`SchedulerOutput`); the runner computes it and answers
with numbers (`ModelRunnerOutput`). Neither sees the other's objects: the runner never holds a
`Sequence`, the scheduler never a tensor. Under tensor/pipeline parallelism the very same
dataclasses are what crosses the process boundary (pickled over the control group), so every
rank builds identical inputs from identical data and there is no second type for the wire.

What the runner must remember between steps (a request's sampling parameters, its block table,
its seeded generator) it is told once: a request's parameters arrive in `new_requests` the first
time it is scheduled, its block table grows by the `new_block_ids` of each row, and
`finished_request_ids` tells it whose state to drop.

Parallel sampling (n > 1): the step that computes a prompt's last chunk also carries a row for
each other sample, right after the prompt's row, with no new tokens (`fork_of` names the prompt's
request): it shares the prompt's KV blocks and samples from the same last position. Copies of
shared blocks (copy-on-write) travel in `block_copies` and are made on every rank before the
step's forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graphwise.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequest:
    """What the runner keeps for a request across steps (sent the first time it is scheduled)."""

    request_id: str
    sampling_params: SamplingParams
    # Token ids masked while the request has fewer than min_tokens outputs: its stop token ids
    # and the model's EOS ids (empty when min_tokens is 0).
    min_tokens_banned: tuple[int, ...] = ()
    num_prompt_tokens: int = 0  # penalties tell prompt tokens from generated ones
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences never completed
    # The prompt, sent only with prompt_logprobs: a chunk's last position scores the next
    # chunk's first token, which its row does not carry.
    prompt_token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class ScheduledRow:
    """One request's share of a step: `num_new_tokens` positions starting at
    `num_computed_tokens` (a prefill chunk, or one decode token)."""

    request_id: str
    num_computed_tokens: int  # KV positions already in the cache before this step
    num_new_tokens: int
    # The input ids of the step's positions that the host knows. With async scheduling the
    # last input may still be on the device: then `token_ids` is one shorter and `pending_row`
    # is the row of the previous step's sampled tokens that holds it.
    token_ids: list[int]
    pending_row: int = -1
    new_block_ids: list[int] = field(default_factory=list)  # appended to the block table
    reset_block_table: bool = False  # the table is `new_block_ids` alone (new or resumed)
    sample: bool = False  # this step samples the request's next token
    ban_stop_tokens: bool = False  # below min_tokens: mask NewRequest.min_tokens_banned
    # A forked sample (num_new_tokens 0): the request whose row, just before, computes the
    # prompt's last position; this row samples from that position's logits too.
    fork_of: str | None = None
    # Speculative decoding: the row's last `num_draft_tokens` positions hold proposed tokens the
    # step verifies (num_new_tokens = 1 + drafts). The runner computes logits at every position
    # of the row and answers with the accepted drafts and one token after them. N-gram drafts
    # are the last `num_draft_tokens` of `token_ids`; with `propose` the runner's draft model
    # proposes them in the step (token_ids then holds only the row's first token).
    num_draft_tokens: int = 0
    propose: bool = False
    # Draft model only: the request's tokens just before this row whose KV the draft model
    # lacks (it computes them first; after a verify step that accepted every draft, the last
    # draft). Empty almost always: the draft computes every row the target computes.
    draft_catch_up: list[int] = field(default_factory=list)

    @property
    def num_tokens_after(self) -> int:
        """The request's KV length once this step has run."""
        return self.num_computed_tokens + self.num_new_tokens


@dataclass
class GrammarBitmask:
    """The structured-output mask of a step's constrained rows: `rows` index the step's sampled
    rows; `bitmask` is their [len(rows), ceil(vocab / 32)] int32 words (bit j of word i allows
    token 32 i + j): a CPU tensor from the engine (pinned on CUDA engines, copied to the device
    once, asynchronously), or a numpy array. None while the step is launched with its sampling
    deferred: the mask depends on a token the previous step is still sampling (async
    scheduling); the engine sends it with `sample_deferred` once that token is known."""

    rows: list[int]
    bitmask: Any = None  # torch.Tensor | np.ndarray; `Any` keeps core free of both


@dataclass
class SchedulerOutput:
    step_id: int = 0
    rows: list[ScheduledRow] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    # Requests that finished or were aborted since the last step: the runner drops their state.
    finished_request_ids: list[str] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    # KV blocks to copy (src, dst) in every layer before the forward (copy-on-write of blocks
    # that forked samples share).
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    num_prefill_tokens: int = 0  # prompt tokens computed by this step
    num_context_tokens: int = 0  # KV positions the step reads, summed over its rows
    # Rows under a structured-output constraint (None: none is, and the step pays nothing).
    grammar: GrammarBitmask | None = None
    num_draft_tokens: int = 0  # over the rows (0: a plain step, which pays nothing for drafts)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_new_tokens for r in self.rows)

    @property
    def is_decode_only(self) -> bool:
        """Every row adds one token and samples (what a decode CUDA graph can replay)."""
        return all(r.num_new_tokens == 1 and r.sample for r in self.rows)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(slots=True)
class SampleLogprobs:
    """One sampled token's log-probability and rank (1: the most likely), and the most likely
    tokens' (as many as the request asked for), from the log-softmax of the raw logits."""

    logprob: float
    rank: int
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass(slots=True)
class PromptLogprobs:
    """Prompt logprobs of consecutive prompt positions: entry i is computed at position
    `start + i` and scores prompt token `start + i + 1` (its logprob and rank), with the most
    likely tokens there (as many as the request asked for)."""

    start: int
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.logprobs)

    def extend(self, more: PromptLogprobs) -> None:
        """Append the entries of `more` that come after these (a recomputed prefix, after a
        preemption, is dropped rather than duplicated)."""
        skip = self.start + len(self) - more.start
        if skip < 0:
            raise ValueError(f"prompt logprobs from {more.start} leave a gap after {self.start}")
        self.logprobs.extend(more.logprobs[skip:])
        self.ranks.extend(more.ranks[skip:])
        self.top_ids.extend(more.top_ids[skip:])
        self.top_logprobs.extend(more.top_logprobs[skip:])


@dataclass
class ModelRunnerOutput:
    """A step's numbers: the sampled token of each row that samples, in row order."""

    req_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    # By row, like sampled_token_ids: None where the request asked for no logprobs (all None,
    # or empty, when none did).
    # Keyword-only from here: a positional flag once landed in `logprobs` (a graph step's
    # True), which only a GPU run showed.
    logprobs: list[SampleLogprobs | None] = field(default_factory=list, kw_only=True)
    used_cuda_graph: bool = field(default=False, kw_only=True)
    # By request, for the rows of requests with prompt_logprobs whose chunk covers prompt
    # positions (whether or not the row samples).
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict, kw_only=True)
    # Requests the runner found it could not run (a row it cannot build inputs for), with why.
    errors: dict[str, str] = field(default_factory=dict, kw_only=True)
    # Steps that verify drafts: by sampled row, every token the row produced (its accepted
    # drafts, then the target's token after them); sampled_token_ids then holds each row's
    # last. None in plain steps.
    spec_token_ids: list[list[int]] | None = field(default=None, kw_only=True)
    # Verify steps, by sampled row like spec_token_ids: the logprobs of each of the row's
    # tokens (each at the position that produced it) for verify rows that asked; None for the
    # rest (their `logprobs` entry, if any, is their one token's).
    spec_logprobs: list[list[SampleLogprobs] | None] | None = field(default=None, kw_only=True)
