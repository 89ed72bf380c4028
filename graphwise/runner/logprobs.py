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
    logprobs: torch.Tensor, tokens: torch.Tensor, wanted: list[tuple[int, int]], upload: Upload
) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    """Per asking row: [sampled token's logprob, top-K logprobs] and [its rank, top-K ids]."""
    if len(wanted) == tokens.shape[0]:
        picked = tokens
    else:
        (rows,) = upload(torch.int64, [r for r, _ in wanted])
        picked = tokens.index_select(0, rows)
    token_lp = logprobs.gather(1, picked[:, None])
    rank = (logprobs > token_lp).sum(dim=-1, keepdim=True) + 1
    k = min(max(k for _, k in wanted), logprobs.shape[-1])
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
