"""Two optional hooks for looking inside a decode step; neither costs anything unless installed.

`BandwidthEmulator` makes this GPU behave like one with less memory bandwidth: after each decoder
layer (and the LM head) it enqueues a GPU-side spin (`torch.cuda._sleep`, calibrated once
against the clock) for the time the layer's bytes would take extra on the slower card:

    delay = bytes / target_bandwidth - bytes / this_card_bandwidth

where bytes = the layer's weights + the KV it reads (context tokens x 2 x kv_heads x head_dim x
element size), and this card's bandwidth is its measured copy bandwidth. "What the layer took"
is thus estimated by the byte floor on this card, not measured per layer; kernels that reach
the same fraction of either card's bandwidth make the estimate slightly short (conservative).
The spin is a kernel, so it is captured into CUDA graphs like any other; the host path only gains
one small launch per layer. The KV term needs the step's context lengths: eager steps read them
from the attention metadata, captured graphs (whose metadata has no host copy) use
`default_context` per sequence. MoE layers count all their experts' weights (an overestimate at
small batch).

`install_nvtx` wraps the engine's phases (step, schedule, prepare, forward, logits, sample) in
NVTX ranges for Nsight Systems, by wrapping the bound methods of one engine instance.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graphwise.layers.attention import ForwardContext

logger = logging.getLogger(__name__)


# ---- bandwidth emulation -------------------------------------------------------------------
def extra_seconds(nbytes: float, target_bandwidth: float, actual_bandwidth: float) -> float:
    """How much longer reading `nbytes` takes at target than at actual bandwidth (never < 0)."""
    if target_bandwidth <= 0 or actual_bandwidth <= 0:
        raise ValueError("bandwidths must be positive bytes/s")
    return max(0.0, nbytes / target_bandwidth - nbytes / actual_bandwidth)


def calibrate_sleep(device: torch.device, cycles: int = 2_000_000, reps: int = 5) -> float:
    """Clock cycles per second of `torch.cuda._sleep` on this GPU (the median of a few runs)."""
    torch.cuda._sleep(1000)  # first launch: module load
    torch.cuda.synchronize(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    rates = []
    for _ in range(reps):
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        rates.append(cycles / (start.elapsed_time(end) / 1e3))
    return statistics.median(rates)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a graphwise model (model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers to hook")
    return list(layers)


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass
class LayerCost:
    weight_bytes: int
    kv_bytes_per_token: int  # K and V of one token in this layer


class BandwidthEmulator:
    def __init__(
        self,
        model: nn.Module,
        kv_bytes_per_token_per_layer: int,
        target_bandwidth: float,
        actual_bandwidth: float,
        default_context: int,
        cycles_per_second: float | None = None,
        sleep: Callable[[int], None] | None = None,
    ) -> None:
        self.model = model
        self.target_bandwidth = float(target_bandwidth)
        self.actual_bandwidth = float(actual_bandwidth)
        self.default_context = default_context
        self.cycles_per_second = cycles_per_second
        self._sleep = sleep or torch.cuda._sleep
        self.layers = decoder_layers(model)
        self.costs = [LayerCost(_param_bytes(m), kv_bytes_per_token_per_layer) for m in self.layers]
        lm_head = getattr(model, "lm_head", None)
        self.lm_head = lm_head if isinstance(lm_head, nn.Module) else None
        self.lm_head_bytes = _param_bytes(self.lm_head) if self.lm_head is not None else 0
        self._handles: list[Any] = []
        self._cycles_cache: dict[tuple[int, int], int] = {}
        self.delays_enqueued = 0
        if self.target_bandwidth >= self.actual_bandwidth:
            logger.warning(
                "emulated bandwidth %.2f TB/s is not below this card's %.2f TB/s: no delay added",
                self.target_bandwidth / 1e12,
                self.actual_bandwidth / 1e12,
            )

    # -- arithmetic (pure) --
    def layer_bytes(self, layer: int, kv_tokens: int) -> int:
        cost = self.costs[layer]
        return cost.weight_bytes + kv_tokens * cost.kv_bytes_per_token

    def layer_delay_s(self, layer: int, kv_tokens: int) -> float:
        return extra_seconds(
            self.layer_bytes(layer, kv_tokens), self.target_bandwidth, self.actual_bandwidth
        )

    def lm_head_delay_s(self) -> float:
        return extra_seconds(self.lm_head_bytes, self.target_bandwidth, self.actual_bandwidth)

    def step_delay_s(self, batch_size: int, context_len: int) -> float:
        """The delay one decode step of batch_size x context_len gains (all layers + LM head)."""
        tokens = batch_size * context_len
        layers = sum(self.layer_delay_s(i, tokens) for i in range(len(self.costs)))
        return layers + self.lm_head_delay_s()

    def _kv_tokens(self, args: tuple[Any, ...]) -> int:
        ctx = next((a for a in args if isinstance(a, ForwardContext)), None)
        if ctx is None:
            return 0
        if ctx.meta.seq_lens_cpu:
            return int(sum(ctx.meta.seq_lens_cpu))
        return ctx.meta.batch_size * self.default_context  # a captured graph: no host copy

    def _cycles(self, layer: int, kv_tokens: int) -> int:
        key = (layer, kv_tokens)
        if key not in self._cycles_cache:
            seconds = self.lm_head_delay_s() if layer < 0 else self.layer_delay_s(layer, kv_tokens)
            self._cycles_cache[key] = int(seconds * (self.cycles_per_second or 0.0))
        return self._cycles_cache[key]

    # -- hooks --
    def install(self) -> BandwidthEmulator:
        if self._handles:
            return self
        if self.cycles_per_second is None:
            device = next(self.model.parameters()).device
            if device.type != "cuda":
                raise ValueError("--emulate-bandwidth needs a CUDA device (it adds GPU-side delay)")
            self.cycles_per_second = calibrate_sleep(device)
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._layer_hook(index)))
        if self.lm_head is not None:
            self._handles.append(self.lm_head.register_forward_hook(self._layer_hook(-1)))
        logger.info(
            "Emulating %.2f TB/s memory bandwidth (this card: %.2f TB/s copy) with GPU-side "
            "delays after %d layers%s",
            self.target_bandwidth / 1e12,
            self.actual_bandwidth / 1e12,
            len(self.layers),
            " and the LM head" if self.lm_head is not None else "",
        )
        return self

    def _layer_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            cycles = self._cycles(index, self._kv_tokens(args) if index >= 0 else 0)
            if cycles > 0:
                self._sleep(cycles)
                self.delays_enqueued += 1

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ---- NVTX ranges -------------------------------------------------------------------------
class _RangeTracer:
    def __init__(self, push: Callable[[str], object], pop: Callable[[], object]) -> None:
        self.push_range, self.pop_range = push, pop

    def push(self, name: str) -> None:
        self.push_range(name)

    def pop(self) -> None:
        self.pop_range()


def install_nvtx(
    engine: Any,
    push: Callable[[str], object] | None = None,
    pop: Callable[[], object] | None = None,
) -> Callable[[], None]:
    """NVTX ranges around one engine's phases, through the spans it offers (core/tracing.py):
    step > schedule, launch > prepare, forward, logits, sample; then step > resolve (the wait
    for a step's tokens and their processing: with async scheduling, the previous step's).
    Returns a function that removes them. `push`/`pop` default to torch.cuda.nvtx (tests pass
    recorders)."""
    from graphwise.core.tracing import NULL_TRACER

    engine.set_tracer(
        _RangeTracer(push or torch.cuda.nvtx.range_push, pop or torch.cuda.nvtx.range_pop)
    )
    return lambda: engine.set_tracer(NULL_TRACER)
