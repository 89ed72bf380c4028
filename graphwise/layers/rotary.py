"""Rotary position embedding (NeoX / HF Llama layout) with Llama-3, linear and LongRoPE scaling.

Layers with the same RoPE settings share one cos/sin table (`get_rotary`): a table is
max_position x head_dim fp32, 128 MiB for Gemma 3's 131072 positions at head_dim 256, and
building one per layer would cost gigabytes for nothing.
"""

from __future__ import annotations

import json
import math
import weakref
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def rope_type(scaling: dict[str, Any] | None) -> str:
    scaling = scaling or {}
    name = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    return "longrope" if name == "su" else name  # Phi-3's early name for LongRoPE


def check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    """A clear error for a RoPE variant we do not implement (never a silent default RoPE)."""
    name = rope_type(scaling)
    if name not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {name!r} is not supported ({', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if name == "longrope":
        assert scaling is not None
        missing = [
            k
            for k in ("short_factor", "long_factor", "original_max_position_embeddings")
            if scaling.get(k) is None
        ]
        if missing:
            raise ValueError(f"longrope scaling lacks {', '.join(missing)}")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _exponents(head_dim: int) -> torch.Tensor:
    return torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim


def compute_inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies of the default, linear and Llama-3 variants (LongRoPE has two sets:
    see `longrope_tables`)."""
    check_rope_scaling(scaling)
    inv_freq = 1.0 / (base ** _exponents(head_dim))
    name = rope_type(scaling)
    if name == "default":
        return inv_freq
    assert scaling is not None
    if name == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if name == "linear":
        return inv_freq / float(scaling["factor"])
    raise ValueError(f"rope_scaling type {name!r} has no single set of frequencies")


def longrope_tables(
    head_dim: int, base: float, scaling: dict[str, Any], max_position: int
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(short inv_freq, long inv_freq, attention factor, original context) of Phi-3's LongRoPE.

    HF multiplies cos and sin by the attention factor, which defaults to
    sqrt(1 + ln(factor) / ln(original context)), factor = max_position / original context."""
    original = int(scaling["original_max_position_embeddings"])
    exps = _exponents(head_dim)
    short = 1.0 / (torch.tensor(scaling["short_factor"], dtype=torch.float32) * base**exps)
    long = 1.0 / (torch.tensor(scaling["long_factor"], dtype=torch.float32) * base**exps)
    attention = scaling.get("attention_factor")
    if attention is None:
        factor = float(scaling.get("factor") or max_position / original)
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return short, long, float(attention), original


def cos_sin_table(
    head_dim: int, max_position: int, base: float, scaling: dict[str, Any] | None
) -> torch.Tensor:
    """[max_position, head_dim] fp32: cos in the first half, sin in the second (kernel layout).

    LongRoPE: HF switches a whole sequence to the long factors once it is longer than the
    original context (and re-runs the prompt); a paged KV cache cannot re-rotate keys already
    stored, so positions below the original context use the short factors and positions at or
    past it the long ones. Identical to HF for every sequence within the original context."""
    positions = torch.arange(max_position, dtype=torch.float32)
    if rope_type(scaling) == "longrope":
        assert scaling is not None
        short, long, attention, original = longrope_tables(head_dim, base, scaling, max_position)
        freqs = torch.where(
            positions[:, None] < original,
            torch.outer(positions, short),
            torch.outer(positions, long),
        )
        return torch.cat([freqs.cos() * attention, freqs.sin() * attention], dim=-1)
    freqs = torch.outer(positions, compute_inv_freq(head_dim, base, scaling))
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        cache = cos_sin_table(head_dim, max_position, base, scaling)
        self.register_buffer("cos_sin_cache", cache, persistent=False)


_SHARED: weakref.WeakValueDictionary[tuple[Any, ...], RotaryEmbedding] = (
    weakref.WeakValueDictionary()
)


def get_rotary(
    head_dim: int, max_position: int, base: float, scaling: dict[str, Any] | None = None
) -> RotaryEmbedding:
    """A RotaryEmbedding shared by every layer (of every live model) built with the same
    settings on the same default device; it lives as long as a model holds it."""
    key = (
        head_dim,
        max_position,
        float(base),
        json.dumps(scaling, sort_keys=True, default=str),
        str(torch.get_default_device()),
    )
    rotary = _SHARED.get(key)
    if rotary is None:
        rotary = RotaryEmbedding(head_dim, max_position, base, scaling)
        _SHARED[key] = rotary
    return rotary
