"""Log-probabilities of sampled tokens, on the device inside the step.

Only the rows whose requests asked pay: a log-softmax over their logits, the sampled token's
logprob and rank, and the top-K (K the largest k any of them asked for; each keeps its own k
when the host reads them). The values ride to the host with the sampled tokens, behind the
same event, so async scheduling and graphs are untouched.

Prompt logprobs (`prompt_logprobs`) score each prompt token given the ones before it: for the
prefill rows of requests that ask, the logits at every prompt position of the chunk, in slices
so that a long chunk over a large vocabulary stays small, then the same log-softmax, the
actual next prompt token's logprob and rank, and the top-K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from graphwise.core.step import ScheduledRow
from graphwise.runner.inputs import RequestStates

Upload = Callable[..., list[torch.Tensor]]
MAX_KERNEL_TOPK = 32  # kernels/sampling.py's limit (that module imports Triton: not here)


def log_softmax_rows(
    logits: torch.Tensor, wanted: list[tuple[int, int]], upload: Upload
) -> torch.Tensor | None:
    """float32 log-softmax of the rows in `wanted` ((row, k) pairs); None when none asks."""
    if not wanted:
        return None
    if len(wanted) == logits.shape[0]:
        return torch.log_softmax(logits.float(), dim=-1)
    (rows,) = upload(torch.int64, [r for r, _ in wanted])
    return torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)


def sampled_logprobs(
    logprobs: torch.Tensor,
    tokens: torch.Tensor,
    wanted: list[tuple[int, int]],
    upload: Upload,
    use_triton: bool = False,
) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    """Per asking row: [sampled token's logprob, top-K logprobs] and [its rank, top-K ids].
    `use_triton`: rank and top-K in one Triton pass over the rows (kernels/sampling.py) when
    K is small, instead of a compare, a sum and torch's radix top-k over the vocabulary."""
    if len(wanted) == tokens.shape[0]:
        picked = tokens
    else:
        (rows,) = upload(torch.int64, [r for r, _ in wanted])
        picked = tokens.index_select(0, rows)
    token_lp = logprobs.gather(1, picked[:, None])
    k = min(max(k for _, k in wanted), logprobs.shape[-1])
    if use_triton and 0 < k <= MAX_KERNEL_TOPK:
        from graphwise.kernels.sampling import rank_and_topk

        rank, top_lp, top_ids = rank_and_topk(logprobs, token_lp, k)
        return wanted, torch.cat([token_lp, top_lp], 1), torch.cat([rank, top_ids], 1)
    rank = (logprobs > token_lp).sum(dim=-1, keepdim=True) + 1
    if k == 0:
        return wanted, token_lp, rank
    top_lp, top_ids = logprobs.topk(k, dim=-1)
    return wanted, torch.cat([token_lp, top_lp], 1), torch.cat([rank, top_ids], 1)


# Elements of one slice of prompt-position logits (float32: 128 MiB): a long prompt chunk's
# logits over a large vocabulary would otherwise take gigabytes at once.
PROMPT_SLICE_ELEMENTS = 1 << 25


@dataclass
class PromptRows:
    """The step's prompt positions whose logprobs are asked for."""

    rows: list[tuple[str, int, int, int]]  # (request id, first position, positions, k)
    hidden_index: torch.Tensor  # [M] rows of the step's hidden states
    targets: torch.Tensor  # [M] the prompt token each position scores (the next one)
    k: int  # the most top tokens any of them asks for


def plan_prompt_rows(
    rows: list[ScheduledRow], states: RequestStates, upload: Upload
) -> PromptRows | None:
    """Which hidden rows give prompt logprobs this step: of each request that asks, its chunk's
    positions but the prompt's last (that one samples the first output token)."""
    picked: list[tuple[str, int, int, int]] = []
    index: list[int] = []
    targets: list[int] = []
    offset = 0
    for row in rows:
        state = states[row.request_id]
        c, n = row.num_computed_tokens, row.num_new_tokens
        if state.prompt_pending:
            k = state.params.prompt_logprobs
            assert k is not None
            prompt = state.prompt_token_ids
            last = len(prompt) - 1
            end = min(c + n, last)
            if end > c:
                picked.append((row.request_id, c, end - c, k))
                index.extend(range(offset, offset + end - c))
                targets.extend(prompt[c + 1 : end + 1])
            if c + n >= last:
                states.prompt_done(state)
        offset += n
    if not picked:
        return None
    index_t, targets_t = upload(torch.int64, index, targets)
    return PromptRows(picked, index_t, targets_t, max(k for *_, k in picked))


def prompt_logprobs(
    hidden: torch.Tensor,
    plan: PromptRows,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    vocab_size: int,
    keep: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per planned position: [the prompt token's logprob, top-K logprobs] and [its rank, top-K
    ids], from the log-softmax of the raw logits, computed a slice of positions at a time.
    Every rank that computes logits calls this (tensor parallelism gathers them); only the one
    that `keep`s them returns the numbers."""
    step = max(1, PROMPT_SLICE_ELEMENTS // max(1, vocab_size))
    k = min(plan.k, vocab_size)
    values: list[torch.Tensor] = []
    ids: list[torch.Tensor] = []
    total = plan.hidden_index.shape[0]
    for s in range(0, total, step):
        logits = compute_logits(hidden.index_select(0, plan.hidden_index[s : s + step]))
        if not keep:
            continue
        lp = torch.log_softmax(logits.float(), dim=-1)
        del logits
        token_lp = lp.gather(1, plan.targets[s : s + step, None])
        rank = (lp > token_lp).sum(dim=-1, keepdim=True) + 1
        if k:
            top_lp, top_ids = lp.topk(k, dim=-1)
            token_lp, rank = torch.cat([token_lp, top_lp], 1), torch.cat([rank, top_ids], 1)
        values.append(token_lp)
        ids.append(rank)
    if not keep:
        return None
    return torch.cat(values), torch.cat(ids)


@dataclass
class VerifyRows:
    """The verify rows (speculative decoding) whose requests ask for logprobs. A row
    [t, d1 .. dk] emits up to k + 1 tokens, its j-th from its position j: the j-th draft
    position's logits for j < k (the target's, that verified the draft), its last position's
    (the ordinary sampled row's) for j = k. Each emitted token gets the entry plain decoding
    would have given it there: the same log-softmax of the raw logits."""

    rows: list[tuple[int, int, int]]  # (sampled row, positions k + 1, top k asked for)
    draft_logprobs: torch.Tensor  # [D', V] log-softmax at the asking rows' draft positions
    order: torch.Tensor  # [P] per position: its row of cat([draft_logprobs, raw])
    grid: torch.Tensor  # [P] per position: its place in the verify's [S, K + 1] tokens
    top_k: list[int]  # [P] per position: its row's k


def plan_verify_rows(
    draft_logits: torch.Tensor,
    rows: list[int],
    num_drafts: list[int],
    wanted: list[tuple[int, int]],
    upload: Upload,
) -> VerifyRows | None:
    """The log-softmax of the asking verify rows' draft-position logits (`draft_logits` [D, V],
    verify rows `rows` (sampled indices) with `num_drafts` each) and where each of their
    positions finds its numbers; None when no verify row asks. Called before verification,
    which masks the logits of ids past the tokenizer's vocabulary (the raw logprobs of plain
    decoding are taken before that mask too). `wanted` are the (sampled row, k) pairs of the
    step's asking rows, in the order of `log_softmax_rows`' output."""
    asked = {row: (j, k) for j, (row, k) in enumerate(wanted)}
    width = max(num_drafts) + 1
    picked: list[tuple[int, int, int]] = []
    index: list[int] = []  # rows of draft_logits
    order: list[int] = []  # >= 0: a row of draft_logprobs; < 0: -1 - its row of raw
    grid: list[int] = []
    top_k: list[int] = []
    offset = 0
    for s, (row, k) in enumerate(zip(rows, num_drafts, strict=True)):
        if row in asked:
            j, top = asked[row]
            order.extend(range(len(index), len(index) + k))
            order.append(-1 - j)
            index.extend(range(offset, offset + k))
            grid.extend(range(s * width, s * width + k + 1))
            top_k.extend([top] * (k + 1))
            picked.append((row, k + 1, top))
        offset += k
    if not picked:
        return None
    num = len(index)
    order = [o if o >= 0 else num - 1 - o for o in order]
    index_t, order_t, grid_t = upload(torch.int64, index, order, grid)
    draft_lp = torch.log_softmax(draft_logits.index_select(0, index_t).float(), dim=-1)
    return VerifyRows(picked, draft_lp, order_t, grid_t, top_k)


def verify_logprobs(
    plan: VerifyRows, raw: torch.Tensor, emitted: torch.Tensor, upload: Upload
) -> tuple[list[tuple[int, int, int]], torch.Tensor, torch.Tensor]:
    """Per planned position: [its emitted token's logprob, top-K logprobs] and [its rank, top-K
    ids], as `sampled_logprobs` computes them for a plain row. `raw` is the step's
    `log_softmax_rows` output, `emitted` the verify's [S, K + 1] tokens (-1 past a row's last:
    those positions are computed on token 0 and dropped on the host)."""
    logprobs = torch.cat([plan.draft_logprobs, raw]).index_select(0, plan.order)
    tokens = emitted.reshape(-1).index_select(0, plan.grid).clamp(min=0)
    wanted = list(enumerate(plan.top_k))
    _, values, ids = sampled_logprobs(logprobs, tokens, wanted, upload)
    return plan.rows, values, ids
