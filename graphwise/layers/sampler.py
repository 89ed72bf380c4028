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
    noise = torch.empty_like(probs)
    noise.exponential_(generator=default_generator)
    for row, gen in enumerate(t.generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    # Exp(1) noise of exactly 0 would make p / E inf or NaN (0 / 0); p / tiny stays finite.
    noise.clamp_(min=_F32.tiny)
    random_tokens = (probs / noise).argmax(dim=-1)
    return torch.where(random_rows, random_tokens, greedy_tokens)
