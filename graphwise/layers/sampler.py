"""Token sampling on the device, with no host synchronisation.

Random sampling uses the exponential-race form of the Gumbel-max trick: argmax(p / E) with
E ~ Exp(1) draws from p. Each seeded request draws its noise from its own generator, so its
tokens do not depend on which other requests share the batch.

No NaN reaches the race, whatever the logits and parameters: logits are read in float32 (a
float16 row divided by a small temperature overflows), NaN logits count as impossible tokens,
+inf ones as the most likely, each row is shifted so that its largest logit is 0 before the
division by the temperature (so `logit / T` never overflows to +inf and the softmax's sum is
at least 1), a row with no possible token is decoded greedily, and temperatures below
GREEDY_TEMPERATURE are greedy (1e-40 used to overflow to NaN and return token 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphwise.sampling_params import GREEDY_TEMPERATURE

_F32 = torch.finfo(torch.float32)


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [N] float32; below GREEDY_TEMPERATURE (0 included) = greedy
    top_k: torch.Tensor  # [N] int64; vocab size = disabled
    top_p: torch.Tensor  # [N] float32
    all_greedy: bool
    any_top_k_top_p: bool
    generators: list[torch.Generator | None]  # per row: a seeded request's own generator
    min_p: torch.Tensor | None = None  # [N] float32, or None when no row uses it


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits with NaN -> -inf (never chosen) and +inf -> the largest finite float (the
    row's favourite). A new tensor: the caller's logits are left alone."""
    return torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=_F32.max)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Sets to -inf what top-k and top-p drop; the most likely token always survives, so a row
    with a finite maximum keeps a finite maximum."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    kth = sorted_logits.gather(1, (vocab - top_k).clamp(min=0, max=vocab - 1).unsqueeze(1))
    drop = sorted_logits < kth
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    drop |= probs.cumsum(dim=-1) <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def scale_by_temperature(
    logits: torch.Tensor, row_max: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """Sanitized float32 logits [N, V] over per-row temperatures [N], shifted so that each
    row's maximum (`row_max` [N, 1]) is 0: every value is then <= 0 or -inf, and dividing by a
    tiny temperature only pushes values further down, never to +inf or NaN. A row that is all
    -inf comes back as zeros (uniform, so its softmax stays finite); decode it greedily."""
    dead = row_max == float("-inf")
    shifted = logits - torch.where(dead, 0.0, row_max)  # the maximum becomes exactly 0
    scaled = shifted / temperature.unsqueeze(1)
    return torch.where(dead, 0.0, scaled)


def sample(
    logits: torch.Tensor, t: SamplingTensors, default_generator: torch.Generator | None
) -> torch.Tensor:
    """logits [N, V] (any float dtype) -> token ids [N] int64 (on the logits' device)."""
    clean = sanitize_logits(logits)
    greedy_tokens = clean.argmax(dim=-1)
    if t.all_greedy:
        return greedy_tokens
    probs, random_rows = target_probs(clean, t)
    return torch.where(random_rows, _race(probs, t, default_generator), greedy_tokens)


def _race(
    probs: torch.Tensor, t: SamplingTensors, default_generator: torch.Generator | None
) -> torch.Tensor:
    """One draw per row from `probs` [N, V] (the exponential race), each seeded row's noise
    from its own generator."""
    noise = torch.empty_like(probs)
    noise.exponential_(generator=default_generator)
    for row, gen in enumerate(t.generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    # Exp(1) noise of exactly 0 would make p / E inf or NaN (0 / 0); p / tiny stays finite.
    noise.clamp_(min=_F32.tiny)
    return (probs / noise).argmax(dim=-1)


def target_probs(clean: torch.Tensor, t: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution each row samples from (temperature, min_p, top-k, top-p applied to
    sanitized logits), and which rows sample at random (the others are greedy)."""
    row_max = clean.amax(dim=-1, keepdim=True)
    temp = t.temperature.float()
    # Tiny and NaN temperatures are greedy, and so is a row with no possible token (its argmax
    # is 0, as under greedy decoding); inf is clamped so that 0 / T stays 0.
    random_rows = (temp >= GREEDY_TEMPERATURE) & (row_max.squeeze(1) > float("-inf"))
    temperature = torch.where(random_rows, temp, 1.0).clamp(max=_F32.max)
    scaled = scale_by_temperature(clean, row_max, temperature)
    if t.min_p is not None:
        # p / p_max = exp(scaled) (the row's largest scaled logit is 0): dropping p below
        # min_p * p_max is dropping scaled below log(min_p); min_p = 0 drops nothing.
        scaled = scaled.masked_fill(scaled < torch.log(t.min_p)[:, None], float("-inf"))
    if t.any_top_k_top_p:
        scaled = apply_top_k_top_p(scaled, t.top_k, t.top_p)
    probs = scaled.softmax(dim=-1)  # the largest logit is 0: the sum is >= 1, no 0 / 0
    return probs, random_rows


def verify_drafts(
    draft_logits: torch.Tensor,
    draft_ids: torch.Tensor,
    slots: torch.Tensor,
    num_drafts: list[int],
    num_drafts_t: torch.Tensor,
    bonus: torch.Tensor,
    t: SamplingTensors | None,
    default_generator: torch.Generator | None,
    draft_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative verification of S rows' drafts: deterministic ones (the n-gram proposer,
    `draft_probs` None) or drawn from a draft model's distributions `draft_probs` [D, V].

    `draft_logits` [D, V] are the target's logits at the positions that predict the D drafts
    `draft_ids` [D] (row by row, `num_drafts` per row, `num_drafts_t` on the device);
    `slots` [D] place each draft in an [S, K] grid (row * K + index, K = max drafts); `bonus`
    [S] is each row's token sampled after its last draft (the ordinary sampler's, at the row's
    last position); `t` the S rows' sampling parameters (None: all greedy).

    Greedy rows accept drafts while the target's argmax equals them, then emit the argmax.
    Random rows use rejection sampling, which keeps the target distribution p exactly. For a
    general draft distribution q the rule accepts d ~ q with probability min(1, p(d) / q(d))
    and on rejection samples from norm(max(0, p - q)). An n-gram draft is deterministic:
    q = one-hot(d), so
        accept d with probability min(1, p(d) / 1) = p(d),
        on rejection sample from max(0, p - one-hot(d)) / (1 - p(d)): p with d removed,
        renormalized (p(x) / (1 - p(d)) for x != d, 0 for d).
    The token at that position is then d with probability p(d), and x != d with probability
    (1 - p(d)) * p(x) / (1 - p(d)) = p(x): exactly p. Each later position is verified only if
    all before it were accepted, i.e. conditioned on the same prefix the target would have
    seen, so the whole output is distributed as plain sampling. After k accepted drafts the
    bonus token (sampled from p at the last position) follows.

    A draft model's draft d is drawn from its distribution q (`draft_probs`, the draft's
    logits under the request's own temperature, top-k, top-p, min-p). The general rule then
    applies as stated: with u ~ U[0, 1), accept when u q(d) < p(d) (probability
    min(1, p(d) / q(d))), else sample from max(0, p - q), renormalized. The token at that
    position is x with probability
        q(x) min(1, p(x) / q(x)) + (1 - sum_y min(q(y), p(y))) max(0, p(x) - q(x)) / Z
    where Z = sum_y max(0, p(y) - q(y)) = 1 - sum_y min(p(y), q(y)): that is
    min(p(x), q(x)) + max(0, p(x) - q(x)) = p(x). (Z = 0 means p = q, and then every draft is
    accepted; if rounding still rejects one, the token is drawn from p.) Greedy rows ignore q.
    The one-hot rule above is exact given any draft, however it was drawn, but it accepts d
    with probability p(d), on average sum_x q(x) p(x); the rule with q accepts on average
    sum_x min(p(x), q(x)), which is 1 when the draft model matches the target.

    Returns the [S, K + 1] tokens each row emits (accepted drafts, then the target's token;
    -1 after) and the [S] last token of each row."""
    num_rows, width = bonus.shape[0], max(num_drafts)
    clean = sanitize_logits(draft_logits)
    greedy = clean.argmax(dim=-1)
    accept = greedy == draft_ids
    resample = greedy  # greedy rows: on a mismatch the target's argmax is the token
    if t is not None:
        expanded = SamplingTensors(
            temperature=_per_draft(t.temperature, num_drafts, num_drafts_t),
            top_k=_per_draft(t.top_k, num_drafts, num_drafts_t),
            top_p=_per_draft(t.top_p, num_drafts, num_drafts_t),
            all_greedy=False,
            any_top_k_top_p=t.any_top_k_top_p,
            generators=[],
            min_p=None if t.min_p is None else _per_draft(t.min_p, num_drafts, num_drafts_t),
        )
        probs, random = target_probs(clean, expanded)
        p_draft = probs.gather(1, draft_ids.unsqueeze(1)).squeeze(1)
        uniform = torch.empty_like(p_draft)
        noise = torch.empty_like(probs)
        uniform.uniform_(generator=default_generator)
        noise.exponential_(generator=default_generator)
        at = 0
        for gen, k in zip(t.generators, num_drafts, strict=True):
            if gen is not None:  # a seeded request draws from its own stream
                uniform[at : at + k].uniform_(generator=gen)
                noise[at : at + k].exponential_(generator=gen)
            at += k
        noise.clamp_(min=_F32.tiny)
        if draft_probs is None:
            # p with the draft removed; its exponential race samples the renormalized residual
            # (the race ignores the scale). When p(d) = 1 the residual is all zero, but then
            # the draft is always accepted (uniform < 1) and the residual sample is never used.
            residual = probs.scatter(1, draft_ids.unsqueeze(1), 0.0)
            accept_random = uniform < p_draft
        else:
            q_draft = draft_probs.gather(1, draft_ids.unsqueeze(1)).squeeze(1)
            residual = (probs - draft_probs).clamp_(min=0.0)
            residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, probs)
            accept_random = uniform * q_draft < p_draft
        resampled = (residual / noise).argmax(dim=-1)
        accept = torch.where(random, accept_random, accept)
        resample = torch.where(random, resampled, resample)
    grid_accept = torch.zeros(num_rows * width, dtype=torch.int64, device=bonus.device)
    grid_accept[slots] = accept.long()
    grid_draft = torch.full_like(grid_accept, -1)
    grid_draft[slots] = draft_ids
    grid_resample = torch.zeros_like(grid_accept)
    grid_resample[slots] = resample
    num_accepted = grid_accept.view(num_rows, width).cumprod(dim=1).sum(dim=1)  # [S]
    at_reject = grid_resample.view(num_rows, width).gather(
        1, num_accepted.clamp(max=width - 1).unsqueeze(1)
    )
    last = torch.where(num_accepted < num_drafts_t, at_reject.squeeze(1), bonus)
    index = torch.arange(width + 1, device=bonus.device).unsqueeze(0)
    drafts = torch.cat(
        [grid_draft.view(num_rows, width), grid_draft.new_full((num_rows, 1), -1)], 1
    )
    n = num_accepted.unsqueeze(1)
    out = torch.where(index < n, drafts, torch.where(index == n, last.unsqueeze(1), -1))
    return out, last


def draft_sample(
    logits: torch.Tensor, t: SamplingTensors | None, default_generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A draft model's next tokens [N] for N rows, and the distribution each was drawn from
    ([N, V] float32, what verify_drafts calls q; None when every row is greedy). Greedy rows
    take the argmax (their q is one-hot: verification ignores it); random rows draw from their
    request's own distribution (temperature, min_p, top-k, top-p on the draft's logits), each
    seeded request from its own generator."""
    clean = sanitize_logits(logits)
    greedy_tokens = clean.argmax(dim=-1)
    if t is None or t.all_greedy:
        return greedy_tokens, None
    probs, random_rows = target_probs(clean, t)
    tokens = torch.where(random_rows, _race(probs, t, default_generator), greedy_tokens)
    one_hot = torch.zeros_like(probs).scatter_(1, greedy_tokens.unsqueeze(1), 1.0)
    return tokens, torch.where(random_rows.unsqueeze(1), probs, one_hot)


def _per_draft(x: torch.Tensor, num_drafts: list[int], num_drafts_t: torch.Tensor) -> torch.Tensor:
    """A per-row tensor repeated for each of the row's drafts."""
    return x.repeat_interleave(num_drafts_t, dim=0, output_size=sum(num_drafts))
