"""Log-probabilities of sampled tokens, on the device inside the step.

Only the rows whose requests asked pay: a log-softmax over their logits, the sampled token's
logprob and rank, and the top-K (K the largest k any of them asked for; each keeps its own k
when the host reads them). The values ride to the host with the sampled tokens, behind the
same event, so async scheduling and graphs are untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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
