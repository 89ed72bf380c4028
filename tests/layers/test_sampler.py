"""The sampler with hostile numbers: tiny and huge temperatures, +-inf and NaN logits, rows
with one possible token or none, top-k/top-p at their edges, half-precision logits."""

from __future__ import annotations

import math

import pytest
import torch

from graphwise.layers.sampler import (
    SamplingTensors,
    apply_top_k_top_p,
    sample,
    sanitize_logits,
    scale_by_temperature,
)
from graphwise.sampling_params import GREEDY_TEMPERATURE, SamplingParams

INF = float("inf")
NAN = float("nan")
V = 16


def params(
    n: int,
    temperature: float | list[float] = 1.0,
    top_k: int | list[int] = V,
    top_p: float | list[float] = 1.0,
    generators: list[torch.Generator | None] | None = None,
) -> SamplingTensors:
    def column(value: object, dtype: torch.dtype) -> torch.Tensor:
        values = value if isinstance(value, list) else [value] * n
        return torch.tensor(values, dtype=dtype)

    top_k_t, top_p_t = column(top_k, torch.int64), column(top_p, torch.float32)
    return SamplingTensors(
        temperature=column(temperature, torch.float32),
        top_k=top_k_t,
        top_p=top_p_t,
        all_greedy=False,
        any_top_k_top_p=bool((top_k_t < V).any() or (top_p_t < 1).any()),
        generators=generators or [None] * n,
    )


def draw(logits: torch.Tensor, t: SamplingTensors, seed: int = 0) -> torch.Tensor:
    tokens = sample(logits, t, torch.Generator().manual_seed(seed))
    assert tokens.dtype == torch.int64 and tokens.shape == (logits.shape[0],)
    assert ((tokens >= 0) & (tokens < logits.shape[1])).all()
    return tokens


def probabilities(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """What the race samples from, as sample() builds it."""
    clean = sanitize_logits(logits)
    temperature = torch.where(t.temperature >= GREEDY_TEMPERATURE, t.temperature, 1.0)
    scaled = scale_by_temperature(clean, clean.amax(-1, keepdim=True), temperature)
    if t.any_top_k_top_p:
        scaled = apply_top_k_top_p(scaled, t.top_k, t.top_p)
    return scaled.softmax(-1)


def peaked(n: int, winner: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows whose greedy token is `winner` (never 0, so a NaN fallback to 0 shows)."""
    logits = torch.linspace(-3.0, 3.0, V).repeat(n, 1)
    logits[:, winner] = 4.0
    return logits.to(dtype)


@pytest.mark.parametrize("temperature", [0.0, 1e-40, 1e-30, 1e-8, GREEDY_TEMPERATURE / 2])
def test_tiny_temperatures_decode_greedily(temperature: float) -> None:
    logits = peaked(64, winner=5) * 50  # large logits: logits / T overflowed to inf, then NaN
    for seed in range(3):
        assert (draw(logits, params(64, temperature), seed) == 5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature", [GREEDY_TEMPERATURE, 1e-3, 1.0, 1e30, 1e38])
def test_no_nan_at_any_temperature_or_dtype(dtype: torch.dtype, temperature: float) -> None:
    logits = peaked(32, winner=5, dtype=dtype) * 1000  # 4000 / 1e-5 overflows float16 at once
    t = params(32, temperature)
    probs = probabilities(logits, t)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(32))
    tokens = draw(logits, t)
    if temperature <= 1e-3:
        assert (tokens == 5).all()  # the distribution is a point mass at this scale
    if temperature >= 1e30:
        assert len(set(tokens.tolist())) > 1  # near-uniform: not stuck on one token


def test_infinite_and_nan_logits() -> None:
    rows = torch.full((6, V), -INF)
    rows[0, 9] = 0.0  # one possible token
    rows[1] = torch.randn(V)
    rows[1, 11] = INF  # +inf wins over any finite logit
    rows[2] = torch.randn(V)
    rows[2, [3, 12]] = INF  # two +inf: one of them
    rows[3] = torch.randn(V)
    rows[3, :8] = NAN  # NaN logits are never chosen
    rows[4] = NAN  # nothing possible: greedy (token 0), not a NaN race
    rows[5] = (torch.rand(V) * 2 - 1) * 3e38  # finite but extreme
    rows[5, 2] = 3.4e38
    for temperature in (1.0, 1e-4, 1e-40, 50.0):
        t = params(6, temperature)
        assert torch.isfinite(probabilities(rows, t)).all()
        for seed in range(20):
            tokens = draw(rows, t, seed).tolist()
            assert tokens[0] == 9 and tokens[1] == 11 and tokens[2] in (3, 12)
            assert tokens[3] >= 8 and tokens[4] == 0 and tokens[5] == 2


def test_all_but_one_masked_for_every_precision() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        logits = torch.full((4, V), -INF, dtype=dtype)
        for row, token in enumerate((0, 7, 15, 3)):
            logits[row, token] = torch.finfo(dtype).max
        t = params(4, [1.0, 1e-5, 3.0, 1e-40], top_k=[1, V, 4, V], top_p=[1.0, 1e-9, 0.5, 1.0])
        assert draw(logits, t).tolist() == [0, 7, 15, 3]


@pytest.mark.parametrize(
    "top_k, top_p",
    [(1, 1.0), (V, 1e-30), (V, 1e-7), (10**9, 1.0), (0, 1.0), (1, 1e-30), (V, 0.0), (V, NAN)],
)
def test_top_k_top_p_edges_keep_the_favourite(top_k: int, top_p: float) -> None:
    logits = peaked(8, winner=13)
    t = params(8, 1.0, top_k=top_k, top_p=top_p)
    t.any_top_k_top_p = True
    probs = probabilities(logits, t)
    assert torch.isfinite(probs).all() and (probs[:, 13] > 0).all()
    if top_k == 1 or 0 <= top_p <= 1e-7:
        assert (draw(logits, t) == 13).all()


def test_top_p_one_keeps_the_whole_distribution() -> None:
    logits = torch.zeros(4000, V)  # uniform
    tokens = draw(logits, params(4000, 1.0, top_p=1.0, top_k=V))
    assert set(tokens.tolist()) == set(range(V))


def test_sampling_still_follows_the_distribution() -> None:
    # p = (0.1, 0.2, 0.7) over three live tokens, the rest masked; 20k draws in one batch.
    logits = torch.full((20_000, V), -INF)
    logits[:, [2, 6, 9]] = torch.tensor([0.1, 0.2, 0.7]).log()
    for temperature, expected in ((1.0, (0.1, 0.2, 0.7)), (0.5, (1 / 54, 4 / 54, 49 / 54))):
        counts = torch.bincount(draw(logits, params(20_000, temperature)), minlength=V)
        assert counts.sum() == counts[[2, 6, 9]].sum()
        freq = (counts[[2, 6, 9]] / 20_000).tolist()
        assert all(abs(f - e) < 0.015 for f, e in zip(freq, expected, strict=True)), freq


def test_greedy_rows_and_seeded_rows_mix() -> None:
    logits = torch.zeros(3, V)
    logits[:, 4] = 1.0
    gens = [None, torch.Generator().manual_seed(7), None]
    t = params(3, [0.0, 1.0, 1e-20], generators=gens)
    first = draw(logits, t, seed=1)
    t.generators = [None, torch.Generator().manual_seed(7), None]
    second = draw(logits, t, seed=2)  # other rows' noise differs; the seeded row's does not
    assert first[0] == 4 and first[2] == 4 and first[1] == second[1]


def test_input_logits_are_not_modified() -> None:
    logits = torch.tensor([[NAN, INF, 0.0, -INF]]).repeat(2, 1)
    before = logits.clone()
    draw(logits, params(2, 1.0, top_k=2, top_p=0.5))
    assert torch.equal(logits.isnan(), before.isnan())
    assert torch.equal(logits.nan_to_num(0.0), before.nan_to_num(0.0))


def test_sampling_params_greedy_threshold_and_finite_temperature() -> None:
    assert SamplingParams(temperature=1e-40).greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy
    for bad in (NAN, INF, -1e-9):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=bad)
    assert math.isfinite(SamplingParams(temperature=1e300).temperature)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_on_cuda_never_syncs_with_the_host() -> None:
    logits = peaked(8, winner=5, dtype=torch.bfloat16).cuda() * 100
    logits[0, :] = -INF
    logits[1, 3] = INF
    gens = [torch.Generator(device="cuda").manual_seed(1)] + [None] * 7
    t = params(8, [1.0, 1e-40, 0.7, 1e-5, 2.0, 1.0, 0.0, 1.0], top_k=[V, 2, V, V, 4, V, V, 1])
    t.any_top_k_top_p = True
    t.temperature, t.top_k, t.top_p = t.temperature.cuda(), t.top_k.cuda(), t.top_p.cuda()
    t.generators = gens
    sample(logits, t, None)  # warm-up: lazy CUDA initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample(logits, t, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.tolist()[:4] == [0, 3, 5, 5]
