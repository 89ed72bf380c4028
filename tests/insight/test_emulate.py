"""Bandwidth emulation arithmetic and hooks (with a recording sleep, so on CPU), and NVTX ranges
around the engine's phases (with recording push/pop)."""

from __future__ import annotations

import pytest
import torch

from graphwise.insight.emulate import BandwidthEmulator, extra_seconds, install_nvtx
from graphwise.runner.step_timing import decode_step, synthetic_decode_inputs


@pytest.mark.parametrize(
    "nbytes, target, actual, expected",
    [
        (15.23e9, 1.0e12, 3.02e12, 15.23e9 / 1.0e12 - 15.23e9 / 3.02e12),  # 7B on a 4090-like card
        (1e9, 2e12, 2e12, 0.0),  # same card: nothing to add
        (1e9, 4e12, 2e12, 0.0),  # a faster card cannot be emulated: never negative
        (0, 1e12, 3e12, 0.0),
    ],
)
def test_extra_seconds(nbytes, target, actual, expected):
    assert extra_seconds(nbytes, target, actual) == pytest.approx(expected)


def test_extra_seconds_rejects_nonsense():
    with pytest.raises(ValueError):
        extra_seconds(1, 0, 1)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from graphwise.config import EngineConfig
    from graphwise.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(tiny_model_dir("llama")), device="cpu", max_num_seqs=4))


def _emulator(engine, sleeps, context=32):
    mc = engine.model_config
    per_layer = mc.kv_bytes_per_token(engine.dtype) // mc.num_hidden_layers
    return BandwidthEmulator(
        engine.executor.driver.model,
        per_layer,
        target_bandwidth=1e9,
        actual_bandwidth=4e9,
        default_context=context,
        cycles_per_second=1e9,  # 1 cycle per ns
        sleep=sleeps.append,
    )


def test_emulator_delays_each_layer_and_the_lm_head(engine):
    sleeps: list[int] = []
    emu = _emulator(engine, sleeps).install()
    try:
        inputs = synthetic_decode_inputs(engine.executor.driver, 2, 10)
        with torch.inference_mode():
            decode_step(engine.executor.driver, inputs)
    finally:
        emu.remove()
    layers = engine.model_config.num_hidden_layers
    assert len(sleeps) == layers + 1 and emu.delays_enqueued == layers + 1
    # the eager step's metadata carries its context: 2 sequences x 10 tokens
    expected = [int(emu.layer_delay_s(i, 20) * 1e9) for i in range(layers)]
    expected.append(int(emu.lm_head_delay_s() * 1e9))
    assert sleeps == expected
    layer_bytes = emu.layer_bytes(0, 20)
    assert layer_bytes == emu.costs[0].weight_bytes + 20 * emu.costs[0].kv_bytes_per_token
    assert emu.layer_delay_s(0, 20) == pytest.approx(layer_bytes * (1 / 1e9 - 1 / 4e9))
    step = emu.step_delay_s(2, 10)
    assert step == pytest.approx(sum(s / 1e9 for s in expected), rel=1e-6)
    # removed: no more delays
    with torch.inference_mode():
        decode_step(engine.executor.driver, inputs)
    assert len(sleeps) == layers + 1


def test_emulator_uses_the_default_context_without_host_lengths(engine):
    """Inside a captured graph the metadata has no host copy of the lengths."""
    sleeps: list[int] = []
    emu = _emulator(engine, sleeps, context=50).install()
    try:
        inputs = synthetic_decode_inputs(engine.executor.driver, 2, 10)
        inputs.meta.seq_lens_cpu = []
        with torch.inference_mode():
            decode_step(engine.executor.driver, inputs)
    finally:
        emu.remove()
    assert sleeps[0] == int(emu.layer_delay_s(0, 2 * 50) * 1e9)


def test_emulator_needs_cuda_to_calibrate(engine):
    mc = engine.model_config
    emu = BandwidthEmulator(
        engine.executor.driver.model, mc.kv_bytes_per_token(engine.dtype), 1e9, 4e9, 8
    )
    with pytest.raises(ValueError, match="CUDA"):
        emu.install()


def test_nvtx_ranges_nest_around_engine_phases(engine):
    from graphwise.sampling_params import SamplingParams

    events: list[str] = []
    remove = install_nvtx(
        engine, push=lambda n: events.append(f"+{n}"), pop=lambda: events.append("-")
    )
    try:
        engine.add_request(None, SamplingParams(temperature=0, max_tokens=2), [1, 2, 3])
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        remove()
    pushes = [e for e in events if e.startswith("+")]
    assert pushes.count("+step") >= 2 and pushes.count("+sample") == pushes.count("+launch")
    assert events.count("-") == len(pushes)  # balanced
    assert pushes.count("+resolve") >= 2  # each step's tokens are waited for and processed
    first = events[: events.index("+step", 1)] if events.count("+step") > 1 else events
    assert first == [
        "+step",
        "+schedule",
        "-",
        "+launch",
        "+prepare",
        "-",
        "+forward",
        "-",
        "+logits",
        "-",
        "+sample",
        "-",
        "-",
        "-",
    ]
    # removed: nothing listens any more
    n = len(events)
    engine.add_request(None, SamplingParams(temperature=0, max_tokens=1), [1, 2])
    while engine.has_unfinished_requests():
        engine.step()
    assert len(events) == n
