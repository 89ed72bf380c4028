"""A step's rows become device tensors: ids, positions, KV slots, block tables, sampling rows.

The runner keeps, per request, what the scheduler told it once (`RequestStates`): its sampling
parameters, its seeded generator and its block table as an array that grows by the blocks each
row adds (rebuilding every table from Python lists each step costs milliseconds at large batch
and long context).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphwise.core.step import ScheduledRow, SchedulerOutput
from graphwise.layers.attention import AttentionMetadata
from graphwise.sampling_params import SamplingParams


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [N] rows of the hidden states that are sampled
    sampled: list[ScheduledRow]  # the rows that sample, in the order of logits_indices
    spec: SpecInputs | None = None  # a step that verifies drafts (None: a plain step)


@dataclass
class SpecInputs:
    """The drafts of a verify step: which sampled rows carry them, and where their logits are."""

    rows: list[int]  # indices into StepInputs.sampled of the rows with drafts
    num_drafts: list[int]  # per such row
    num_drafts_t: torch.Tensor  # [S] the same, on the device
    logits_indices: torch.Tensor  # [D] hidden-state rows predicting each draft, row by row
    draft_ids: torch.Tensor  # [D] (zeros for drafts the draft model has yet to propose)
    slots: torch.Tensor  # [D] row * max(num_drafts) + index: the drafts' [S, K] grid
    logits: torch.Tensor | None = None  # [D, V] once the runner computed them
    # Draft model: the rows' drafts come from the runner (ScheduledRow.propose), which puts
    # them in `draft_ids` and the step's input ids; `draft_probs` [D, V] is the distribution
    # each was drawn from (None: every row greedy, or deterministic n-gram drafts).
    proposed: bool = False
    draft_probs: torch.Tensor | None = None


class RunnerRequest:
    """What the runner holds for one request between steps."""

    __slots__ = (
        "params", "banned", "num_prompt_tokens", "bad_words", "table", "num_blocks", "generator",
        "special", "prompt_token_ids", "prompt_pending",
    )  # fmt: skip

    def __init__(
        self,
        params: SamplingParams,
        banned: tuple[int, ...],
        num_prompt_tokens: int = 0,
        bad_words: tuple[tuple[int, ...], ...] = (),
        prompt_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.params = params
        self.prompt_token_ids = prompt_token_ids  # only with prompt_logprobs
        self.banned = banned
        self.num_prompt_tokens = num_prompt_tokens
        self.bad_words = bad_words
        # Asks for logprobs or a logits processor: a step of requests that ask for none skips
        # those paths altogether (see RequestStates.num_special).
        self.special = bool(
            params.logprobs is not None
            or params.penalized
            or params.min_p
            or params.logit_bias
            or params.allowed_token_ids
            or bad_words
        )
        # Asks for prompt logprobs, and its prompt has not all been computed here yet (counted
        # apart: see RequestStates.num_prompt_pending).
        self.prompt_pending = params.prompt_logprobs is not None
        self.table = np.zeros(16, dtype=np.int32)
        self.num_blocks = 0
        self.generator: torch.Generator | None = None

    @property
    def needs_history(self) -> bool:
        """Its tokens so far matter to sampling (penalties, multi-token bad words)."""
        return self.params.penalized or any(len(w) > 1 for w in self.bad_words)

    def extend(self, block_ids: list[int], reset: bool) -> None:
        if reset:
            self.num_blocks = 0
        end = self.num_blocks + len(block_ids)
        if end > self.table.size:
            grown = np.zeros(max(end, 2 * self.table.size), dtype=np.int32)
            grown[: self.num_blocks] = self.table[: self.num_blocks]
            self.table = grown
        self.table[self.num_blocks : end] = block_ids
        self.num_blocks = end


class RequestStates(dict[str, RunnerRequest]):
    """The runner's requests by id; counts those that are `special`, so that the common step,
    where none is, pays nothing for logprobs and processors."""

    def __init__(self) -> None:
        super().__init__()
        self.num_special = 0
        # Requests whose prompt logprobs are still to compute: a step looks for prompt rows
        # only while some are (runner/logprobs.py plan_prompt_rows).
        self.num_prompt_pending = 0

    def __setitem__(self, key: str, value: RunnerRequest) -> None:
        old = self.get(key)
        self.num_special += int(value.special) - int(old is not None and old.special)
        self.num_prompt_pending += int(value.prompt_pending) - int(
            old is not None and old.prompt_pending
        )
        super().__setitem__(key, value)

    def pop(self, key: str, default: RunnerRequest | None = None) -> RunnerRequest | None:  # type: ignore[override]
        value = super().pop(key, default)
        if value is not None and value is not default:
            self.num_special -= int(value.special)
            self.num_prompt_pending -= int(value.prompt_pending)
        return value

    def prompt_done(self, state: RunnerRequest) -> None:
        """Its prompt's last logprobs are in this step (a recompute after a preemption would
        repeat them; the scheduler drops those anyway)."""
        if state.prompt_pending:
            state.prompt_pending = False
            self.num_prompt_pending -= 1

    def update(self, step: SchedulerOutput) -> None:
        """Forget finished requests, learn new ones, grow the block tables of this step's rows."""
        for rid in step.finished_request_ids:
            self.pop(rid, None)
        for new in step.new_requests:
            state = RunnerRequest(
                new.sampling_params,
                new.min_tokens_banned,
                new.num_prompt_tokens,
                new.bad_words_ids,
                new.prompt_token_ids,
            )
            old = self.get(new.request_id)
            if old is not None:  # sent again after a failed step: its random stream goes on
                state.generator = old.generator
            self[new.request_id] = state
        for row in step.rows:
            self[row.request_id].extend(row.new_block_ids, row.reset_block_table)

    def block_tables(self, rows: list[ScheduledRow]) -> np.ndarray:
        """The step's [B, max blocks] int32 block table, zero-padded."""
        states = [self[r.request_id] for r in rows]
        out = np.zeros((len(rows), max(s.num_blocks for s in states)), dtype=np.int32)
        for i, s in enumerate(states):
            out[i, : s.num_blocks] = s.table[: s.num_blocks]
        return out


class Uploader:
    """Copies several host lists / arrays to the device in one transfer (pinned and asynchronous
    on CUDA: each separate small copy costs tens of microseconds of host time)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pin = device.type == "cuda"

    def __call__(
        self, dtype: torch.dtype, *parts: list[int] | list[float] | np.ndarray
    ) -> list[torch.Tensor]:
        with torch.inference_mode():  # also when called outside a step (tests, profiling)
            return self._upload(dtype, parts)

    def _upload(
        self, dtype: torch.dtype, parts: tuple[list[int] | list[float] | np.ndarray, ...]
    ) -> list[torch.Tensor]:
        # Each part starts on a 16-byte boundary of the flat buffer. Triton specializes kernels
        # on pointer alignment: views at offsets that depend on the batch size would compile a
        # new variant (a ~1 s stall) whenever a batch shifts an alignment for the first time.
        align = max(1, 16 // torch.empty(0, dtype=dtype).element_size())
        if all(isinstance(x, list) for x in parts):  # small lists: cheapest straight to torch
            sizes = [len(x) for x in parts]
            values: list[int | float] = []
            for x in parts:
                values.extend(x)
                values.extend([0] * (-len(x) % align))
            flat = torch.tensor(values, dtype=dtype)
        else:
            np_dtype = np.int64 if dtype == torch.int64 else np.int32
            arrays = [np.asarray(x, dtype=np_dtype).ravel() for x in parts]
            sizes = [a.size for a in arrays]
            padded = np.zeros(sum(n + (-n % align) for n in sizes), dtype=np_dtype)
            at = 0
            for a in arrays:
                padded[at : at + a.size] = a
                at += a.size + (-a.size % align)
            flat = torch.from_numpy(padded)
        if self.pin:
            # A pinned copy from torch's caching host allocator: it recycles a buffer only after
            # the copy that read it has run, so the host never waits here for the GPU (a pageable
            # copy, or reusing one buffer, would wait for the step that is still running).
            dev = flat.pin_memory().to(self.device, non_blocking=True)
        else:
            dev = flat.to(self.device)
        out, at = [], 0
        for n in sizes:
            out.append(dev[at : at + n])
            at += n + (-n % align)
        return out


@torch.inference_mode()
def build_step_inputs(
    step: SchedulerOutput,
    states: RequestStates,
    upload: Uploader,
    block_size: int,
    last_tokens: torch.Tensor | None,
    max_decode_rows: int | None = None,
) -> StepInputs:
    """The step's tensors. `last_tokens` are the previous launched step's sampled tokens, on the
    device: the inputs of rows whose newest token the host does not know yet. A verify step of
    at most `max_decode_rows` tokens (None: any) attends as decode rows (`as_decode_rows`)."""
    bs = block_size
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    q_lens: list[int] = []
    seq_lens: list[int] = []
    cu = [0]
    logits_indices: list[int] = []
    sampled: list[ScheduledRow] = []
    fill_dst: list[int] = []  # rows of input_ids that take a token still on the device
    fill_src: list[int] = []
    num_forks = 0
    spec_rows: list[tuple[int, int, ScheduledRow]] = []  # (sampled index, first id, row)
    previous = None  # the last row that computes tokens
    for row in step.rows:
        c, n = row.num_computed_tokens, row.num_new_tokens
        if n == 0:
            # A forked sample (n > 1): it samples from the last position of the row before,
            # its prompt's, and computes nothing itself (no attention row of its own).
            if row.fork_of is None or previous is None or previous.request_id != row.fork_of:
                raise ValueError(f"row {row.request_id!r}: no new tokens and not a fork")
            if row.sample:
                logits_indices.append(len(ids) - 1)
                sampled.append(row)
            num_forks += 1
            continue
        previous = row
        ids.extend(row.token_ids)
        if row.pending_row >= 0:
            fill_dst.append(len(ids))
            fill_src.append(row.pending_row)
            ids.append(0)
        if row.propose:  # the draft model's drafts go here once proposed (runner/draft_model.py)
            ids.extend([0] * row.num_draft_tokens)
        if _num_ids(row) != n:
            raise ValueError(f"row {row.request_id!r}: {n} new tokens but {len(row.token_ids)} ids")
        positions.extend(range(c, c + n))
        state = states[row.request_id]
        table = state.table
        slots.extend(int(table[p // bs]) * bs + p % bs for p in range(c, c + n))
        q_lens.append(n)
        seq_lens.append(c + n)
        cu.append(cu[-1] + n)
        if row.sample:
            if row.num_draft_tokens:
                spec_rows.append((len(sampled), len(ids) - n, row))
            logits_indices.append(len(ids) - 1)
            sampled.append(row)
    attn_rows = [r for r in step.rows if r.num_new_tokens] if num_forks else step.rows
    tables = states.block_tables(attn_rows)
    width = tables.shape[1]
    if verifies_as_decode(attn_rows, len(ids), max_decode_rows):
        tables, seq_lens = as_decode_rows(tables, q_lens, seq_lens)
        q_lens = [1] * len(ids)
        cu = list(range(len(ids) + 1))
    ids_t, pos_t, slots_t, logits_t, dst_t, src_t = upload(
        torch.int64, ids, positions, slots, logits_indices, fill_dst, fill_src
    )
    if fill_dst:
        if last_tokens is None:
            raise RuntimeError("a pending token but no step was launched before")
        ids_t.index_copy_(0, dst_t, last_tokens.index_select(0, src_t))
    seq_lens_t, tables_t, cu_t = upload(torch.int32, seq_lens, tables, cu)
    meta = AttentionMetadata(
        slot_mapping=slots_t,
        seq_lens=seq_lens_t,
        block_tables=tables_t.view(len(q_lens), width),
        cu_seqlens_q=cu_t,
        is_decode=all(n == 1 for n in q_lens),
        max_q_len=max(q_lens),
        max_seq_len=max(seq_lens),
        q_lens_cpu=q_lens,
        seq_lens_cpu=seq_lens,
    )
    spec = _spec_inputs(spec_rows, upload) if spec_rows else None
    return StepInputs(ids_t, pos_t, meta, logits_t, sampled, spec)


# A verify row longer than this stays one extend row: the decode kernel reads a row's KV once per
# query token, which pays only while the tokens are few (speculation's k is a handful).
MAX_DECODE_ROW_TOKENS = 16


def verifies_as_decode(rows: list[ScheduledRow], num_tokens: int, max_rows: int | None) -> bool:
    """The step verifies drafts and every row is a decode row (one token) or a short verify row
    (its token and its drafts), at most `max_rows` tokens in all: no prompt rows."""
    if max_rows is not None and num_tokens > max_rows:
        return False
    verifies = False
    for row in rows:
        n, k = row.num_new_tokens, row.num_draft_tokens
        if n == 1:
            continue
        if not k or n != 1 + k or n > MAX_DECODE_ROW_TOKENS:
            return False
        verifies = True
    return verifies


def as_decode_rows(
    tables: np.ndarray, q_lens: list[int], seq_lens: list[int]
) -> tuple[np.ndarray, list[int]]:
    """Block tables [T, W] and KV lengths [T] that make each new token an attention row of its
    own: token i of a row of q new tokens and KV length s sees the row's first s - q + i + 1
    positions through the row's block table.

    Why: a verify step (each row's last token and its k drafts) then is a decode step of T
    rows, which replays the decode CUDA graph of bucket T instead of running the extend path
    eagerly (issue 21: an eager verify step cost ~3 graph decode steps). Causality is exact:
    every backend stores the step's K/V for all T tokens before any attention (layers/attention
    `forward`), and a row's length ends at its own token, so each token sees the same keys as
    in the extend path (sliding windows count back from the same last position). The ids,
    positions, slots and logits rows need no change: they are per token already."""
    per_token = [s - q + i + 1 for q, s in zip(q_lens, seq_lens, strict=True) for i in range(q)]
    return np.repeat(tables, q_lens, axis=0), per_token


def _spec_inputs(spec_rows: list[tuple[int, int, ScheduledRow]], upload: Uploader) -> SpecInputs:
    """A row [t, d1 .. dk] predicts d(j+1) at its position j: the logits at its first k
    positions verify its k drafts (its last position's, the ordinary sampled one, gives the
    token after them)."""
    width = max(row.num_draft_tokens for _, _, row in spec_rows)
    indices: list[int] = []
    drafts: list[int] = []
    slots: list[int] = []
    for s, (_, start, row) in enumerate(spec_rows):
        k = row.num_draft_tokens
        indices.extend(range(start, start + k))
        drafts.extend([0] * k if row.propose else row.token_ids[len(row.token_ids) - k :])
        slots.extend(range(s * width, s * width + k))
    num_drafts = [row.num_draft_tokens for _, _, row in spec_rows]
    indices_t, drafts_t, slots_t, num_t = upload(torch.int64, indices, drafts, slots, num_drafts)
    proposed = spec_rows[0][2].propose
    if any(row.propose != proposed for _, _, row in spec_rows):
        raise ValueError("a step mixes n-gram drafts with draft-model ones")
    return SpecInputs(
        [i for i, _, _ in spec_rows],
        num_drafts,
        num_t,
        indices_t,
        drafts_t,
        slots_t,
        proposed=proposed,
    )


def _num_ids(row: ScheduledRow) -> int:
    """The input ids a row supplies: its known ids, a pending one, the drafts to propose."""
    return (
        len(row.token_ids) + (row.pending_row >= 0) + (row.num_draft_tokens if row.propose else 0)
    )


def find_bad_rows(
    step: SchedulerOutput,
    states: RequestStates,
    vocab_size: int,
    num_blocks: int,
    max_positions: int,
) -> dict[str, str]:
    """Rows this runner cannot build inputs for, with why: checked one by one on the host (what
    the engine asks when a step failed, to fail only the requests that caused it)."""
    banned = {rid: s.banned for rid, s in states.items()}
    banned.update((r.request_id, r.min_tokens_banned) for r in step.new_requests)
    bad: dict[str, str] = {}
    for row in step.rows:
        rid = row.request_id
        if rid not in banned:
            bad[rid] = "the runner holds no state for this request"
            continue
        ids = [
            *row.draft_catch_up,
            *row.token_ids,
            *(banned[rid] if row.ban_stop_tokens else ()),
        ]
        wrong = next((t for t in ids if not 0 <= t < vocab_size), None)
        if wrong is not None:
            bad[rid] = f"token id {wrong} is outside the vocabulary [0, {vocab_size})"
        elif any(not 0 <= b < num_blocks for b in row.new_block_ids):
            bad[rid] = f"a KV block id outside [0, {num_blocks})"
        elif row.num_tokens_after > max_positions:
            bad[rid] = f"position {row.num_tokens_after - 1} is past the model's {max_positions}"
        elif _num_ids(row) != row.num_new_tokens:
            bad[rid] = "the row's token ids do not match its token count"
    return bad
