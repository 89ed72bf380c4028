"""QuantizationConfig: which format a model's weights are in, and which LinearMethod each
linear layer gets.

Two sources, with vLLM's names: the checkpoint's `quantization_config` (config.json) and the
`quantization=` option (LLM, EngineConfig, the CLIs). A checkpoint's format wins; an option that
names another format is an error. `quantization="fp8"` on an unquantized checkpoint quantizes it
at load (online FP8).

Formats register a parser in `FORMATS` (name -> from_hf(quantization_config or None for
online)); names vLLM knows that graphwise does not (yet) read are refused with a message
naming them. Layers learn the config the way they learn their TP shard: the model builder
enters `building(config)`, layers built inside leave their weights to `finalize`, which walks
the model by name (the checkpoint's `ignore` lists are by name) and gives each layer its method.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

from graphwise.layers.quantization.base import UNQUANTIZED, LinearMethod


class QuantizationConfig:
    """One format's settings, read from a checkpoint (or the defaults of online quantization)."""

    name = ""  # vLLM's name, e.g. "fp8", "compressed-tensors"
    # True when the format cannot quantize full-precision weights at load: without a checkpoint
    # in the format only load_format="dummy" (random packed weights) can build the model.
    requires_checkpoint = False

    def linear_method(self, prefixes: list[str]) -> LinearMethod:
        """The method for the linear layer whose checkpoint projections are named `prefixes`
        (one name, or one per shard of a packed layer: q_proj, k_proj, v_proj)."""
        raise NotImplementedError

    def check_moe(self, where: str) -> None:
        """Raise unless this format can run the experts of a MoE layer (`where`: its name)."""
        raise ValueError(
            f"quantization {self.name!r} does not support MoE expert weights yet ({where}); "
            "use an unquantized checkpoint for this model"
        )

    def describe(self) -> str:
        return self.name


# name -> parser of the checkpoint's quantization_config (None: quantize online)
FORMATS: dict[str, Callable[[dict[str, Any] | None], QuantizationConfig]] = {}
# vLLM's names that graphwise refuses with a reason (a format that lands moves to FORMATS).
KNOWN_UNSUPPORTED: dict[str, str] = {
    "gguf": "quantization='gguf' needs a .gguf model file (--model FILE.gguf)",
    "bitsandbytes": "bitsandbytes weights are not supported",
    "awq_marlin": "graphwise runs AWQ checkpoints with its own kernels: use quantization='awq'",
    "gptq_marlin": "graphwise runs GPTQ checkpoints with its own kernels: use quantization='gptq'",
    "marlin": "Marlin weights are not supported",
    "modelopt": "NVIDIA ModelOpt checkpoints are not supported",
    "fbgemm_fp8": "fbgemm_fp8 checkpoints are not supported (compressed-tensors and fp8 are)",
    "hqq": "HQQ weights are not supported",
    "aqlm": "AQLM weights are not supported",
    "deepspeedfp": "deepspeedfp weights are not supported",
    "experts_int8": "experts_int8 is not supported",
    "mxfp4": "MXFP4 weights are not supported",
    "bitnet": "BitNet weights are not supported",
}


def supported_names() -> list[str]:
    return sorted(FORMATS)


def check_name(name: str) -> None:
    """Raise for a `quantization=` value graphwise cannot run (before anything is built)."""
    if name in FORMATS:
        return
    reason = KNOWN_UNSUPPORTED.get(name)
    raise ValueError(
        f"quantization={name!r} is not supported"
        + (f" ({reason})" if reason else "")
        + f"; supported: {', '.join(supported_names())}"
    )


def resolve(option: str | None, hf_config: dict[str, Any] | None) -> QuantizationConfig | None:
    """The config to build the model with: from the checkpoint's `quantization_config`
    (`hf_config`), or online from `option`; None for unquantized weights."""
    if hf_config:
        method = str(hf_config.get("quant_method", "")).lower().replace("_", "-")
        method = {"compressed-tensors": "compressed-tensors"}.get(method, method)
        if method not in FORMATS:
            reason = KNOWN_UNSUPPORTED.get(method.replace("-", "_"))
            raise ValueError(
                f"checkpoint quantization_config.quant_method {hf_config.get('quant_method')!r} "
                "is not supported"
                + (f" ({reason})" if reason else "")
                + f"; supported: {', '.join(supported_names())}"
            )
        if option is not None and option != method:
            raise ValueError(
                f"quantization={option!r} does not match the checkpoint's "
                f"quantization_config.quant_method {method!r} (leave quantization unset)"
            )
        return FORMATS[method](hf_config)
    if option is None:
        return None
    check_name(option)
    return FORMATS[option](None)


def matches(name: str, patterns: list[str]) -> bool:
    """compressed-tensors / vLLM target matching: "re:<regex>" (searched from the start of
    the module name), a suffix of the module path, or a class name "Linear"."""
    for pat in patterns:
        if pat.startswith("re:"):
            if re.match(pat[3:], name):
                return True
        elif pat == "Linear" or name == pat or name.endswith("." + pat):
            return True
    return False


def one_method(
    prefixes: list[str], method_of: Callable[[str], LinearMethod], fmt: str
) -> LinearMethod:
    """The method every shard of a packed layer agrees on; a clear error when they differ
    (a format whose shards may differ overrides `linear_method` instead)."""
    methods = [method_of(p) for p in prefixes]
    if any(type(m) is not type(methods[0]) or m != methods[0] for m in methods[1:]):
        kinds = ", ".join(f"{p}: {m.name}" for p, m in zip(prefixes, methods, strict=True))
        raise ValueError(f"{fmt}: the packed projections {kinds} are quantized differently")
    return methods[0]


# ---- the config of the model being built -----------------------------------------------
_building: QuantizationConfig | None = None


def current() -> QuantizationConfig | None:
    """The config of the model being built (None: unquantized; layers then create their
    weights at once, exactly as without this package)."""
    return _building


@contextlib.contextmanager
def building(config: QuantizationConfig | None) -> Iterator[None]:
    """Linear layers built inside wait for `linear.create_quantized_weights(model, config)`."""
    global _building
    previous, _building = _building, config
    try:
        yield
    finally:
        _building = previous


__all__ = ["UNQUANTIZED", "QuantizationConfig", "resolve", "building", "current"]
