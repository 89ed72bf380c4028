"""Token sampling on the device, with no host synchronisation.

Random sampling uses the exponential-race form of the Gumbel-max trick: argmax(p / E) with
E ~ Exp(1) draws from p. Each seeded request draws its noise from its own generator, so its
tokens do not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [N] float32; 0 = greedy
    top_k: torch.Tensor  # [N] int64; vocab size = disabled
    top_p: torch.Tensor  # [N] float32
    all_greedy: bool
    any_top_k_top_p: bool
    generators: list[torch.Generator | None]  # per row: a seeded request's own generator


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    kth = sorted_logits.gather(1, (vocab - top_k).clamp(min=0, max=vocab - 1).unsqueeze(1))
    drop = sorted_logits < kth
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    drop |= probs.cumsum(dim=-1) <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def sample(
    logits: torch.Tensor, t: SamplingTensors, default_generator: torch.Generator | None
) -> torch.Tensor:
    """logits [N, V] float32 -> token ids [N] int64 (on the logits' device)."""
    greedy_tokens = logits.argmax(dim=-1)
    if t.all_greedy:
        return greedy_tokens
    temperature = torch.where(t.temperature > 0, t.temperature, 1.0)
    scaled = logits / temperature.unsqueeze(1)
    if t.any_top_k_top_p:
        scaled = apply_top_k_top_p(scaled, t.top_k, t.top_p)
    probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs)
    noise.exponential_(generator=default_generator)
    for row, gen in enumerate(t.generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    random_tokens = (probs / noise).argmax(dim=-1)
    return torch.where(t.temperature > 0, random_tokens, greedy_tokens)
