"""ModelConfig: the architecture facts the engine needs, read from an HF config.json dict.

Accepts both spellings of RoPE settings: transformers 4 (`rope_theta`, `rope_scaling`) and
transformers 5 (`rope_parameters`, flat or per layer type). Which layers use a sliding window
follows each family's HF rule (`layer_types` when the config has it, else the family's default
pattern). A feature we do not implement is an error that names it, never a silent default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from graphwise.layers.activation import GATED_ACTIVATIONS
from graphwise.layers.rotary import check_rope_scaling, rope_type

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
FULL, SLIDING = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)

# RoPE base when the config names none (HF's per-family defaults).
_DEFAULT_THETA = {"MixtralForCausalLM": 1e6, "Gemma3ForCausalLM": 1e6}
# `sliding_window` when the config lacks the key (HF's config defaults; None: no window).
_DEFAULT_WINDOW = {
    "MistralForCausalLM": 4096,
    "Gemma2ForCausalLM": 4096,
    "Gemma3ForCausalLM": 4096,
}
_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
# Families whose HF config ties the LM head to the embedding unless it says otherwise.
_TIED_BY_DEFAULT = _GEMMA
_QWEN_WINDOWED = (
    "Qwen2ForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)


def _every_layer(d: dict[str, Any], n: int) -> list[str]:
    return [SLIDING] * n


def _qwen_upper_layers(d: dict[str, Any], n: int) -> list[str]:
    # Qwen2 / Qwen3: layers from max_window_layers on (transformers 5's rule).
    first = int(d.get("max_window_layers", 28))
    return [SLIDING if i >= first else FULL for i in range(n)]


def _qwen2_moe_layers(d: dict[str, Any], n: int) -> list[str]:
    # Qwen2-MoE: every other layer below max_window_layers (transformers 5's rule).
    last = int(d.get("max_window_layers", 28))
    return [SLIDING if (i + 1) % 2 and i < last else FULL for i in range(n)]


def _gemma2_layers(d: dict[str, Any], n: int) -> list[str]:
    return [SLIDING if (i + 1) % 2 else FULL for i in range(n)]


def _gemma3_layers(d: dict[str, Any], n: int) -> list[str]:
    pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
    return [SLIDING if (i + 1) % pattern else FULL for i in range(n)]


# Which layers slide when the config has no `layer_types`. A family whose HF model passes its
# window to every layer regardless of `layer_types` is listed in `_IGNORES_LAYER_TYPES`.
_WINDOW_LAYERS: dict[str, Callable[[dict[str, Any], int], list[str]]] = {
    "MistralForCausalLM": _every_layer,
    "MixtralForCausalLM": _every_layer,
    "Phi3ForCausalLM": _every_layer,
    "Qwen3MoeForCausalLM": _every_layer,
    "Qwen2ForCausalLM": _qwen_upper_layers,
    "Qwen3ForCausalLM": _qwen_upper_layers,
    "Qwen2MoeForCausalLM": _qwen2_moe_layers,
    "Gemma2ForCausalLM": _gemma2_layers,
    "Gemma3ForCausalLM": _gemma3_layers,
}
_IGNORES_LAYER_TYPES = (
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Phi3ForCausalLM",
    "Qwen3MoeForCausalLM",
)


def _sliding_window(arch: str, d: dict[str, Any]) -> int | None:
    window = d["sliding_window"] if "sliding_window" in d else _DEFAULT_WINDOW.get(arch)
    if arch in _QWEN_WINDOWED and not d.get("use_sliding_window", False):
        window = None  # Qwen configs carry a window they do not use unless told to
    return int(window) if window else None


def _layer_types(arch: str, d: dict[str, Any], n: int, window: int | None) -> list[str]:
    if window is None or arch not in _WINDOW_LAYERS:
        return [FULL] * n
    given = d.get("layer_types")
    if given and arch not in _IGNORES_LAYER_TYPES:
        unknown = sorted(set(given) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(
                f"layer type(s) {unknown} are not supported ({', '.join(LAYER_TYPES)})"
            )
        if len(given) < n:
            raise ValueError(f"layer_types lists {len(given)} layers, the model has {n}")
        return list(given[:n])
    return _WINDOW_LAYERS[arch](d, n)


def _rope_by_layer_type(
    arch: str, d: dict[str, Any]
) -> dict[str, tuple[float, dict[str, Any] | None]]:
    """(theta, scaling or None) for full-attention and sliding-window layers."""
    default_theta = _DEFAULT_THETA.get(arch, 10000.0)
    rope = d.get("rope_parameters") or {}

    def one(params: dict[str, Any], theta: float, scaling: Any) -> tuple[float, Any]:
        if scaling is None and rope_type(params) != "default":
            scaling = params
        if scaling is not None and rope_type(scaling) == "longrope":
            # Phi-3 keeps the original context length at the top level of its config.
            original = scaling.get("original_max_position_embeddings")
            original = original or d.get("original_max_position_embeddings")
            scaling = {**scaling, "original_max_position_embeddings": original}
        check_rope_scaling(scaling)
        factor = (scaling or {}).get("partial_rotary_factor") or params.get("partial_rotary_factor")
        if factor is not None and float(factor) != 1.0:
            raise ValueError(f"partial_rotary_factor={factor} (partial RoPE) is not supported")
        return theta, scaling

    if isinstance(rope.get(FULL), dict) or isinstance(rope.get(SLIDING), dict):
        # transformers 5, per layer type (Gemma 3)
        full_params, sliding_params = rope.get(FULL) or {}, rope.get(SLIDING) or {}
        full = one(full_params, float(full_params.get("rope_theta", default_theta)), None)
        sliding = one(sliding_params, float(sliding_params.get("rope_theta", 10000.0)), None)
        return {FULL: full, SLIDING: sliding}
    theta = float(d.get("rope_theta", rope.get("rope_theta", default_theta)))
    scaling = d.get("rope_scaling") or None
    full = one(rope, theta, scaling)
    if arch == "Gemma3ForCausalLM":  # transformers 4 spelling: a separate local base, unscaled
        return {FULL: full, SLIDING: (float(d.get("rope_local_base_freq", 10000.0)), None)}
    return {FULL: full, SLIDING: full}


def _check_supported(arch: str, d: dict[str, Any]) -> str:
    """The hidden activation; raises for config features no graphwise path implements."""
    act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
    if act not in GATED_ACTIVATIONS:
        raise ValueError(
            f"hidden activation {act!r} is not supported "
            f"(supported: {', '.join(sorted(GATED_ACTIVATIONS))})"
        )
    if d.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention (non-causal attention) is not supported")
    factor = d.get("partial_rotary_factor")
    if factor is not None and float(factor) != 1.0:
        raise ValueError(f"partial_rotary_factor={factor} (partial RoPE) is not supported")
    if d.get("attention_chunk_size"):
        raise ValueError("attention_chunk_size (chunked local attention) is not supported")
    if d.get("mlp_bias"):
        raise ValueError("mlp_bias (biases on the MLP projections) is not supported")
    return str(act)


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float  # full-attention layers
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: torch.dtype | None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    hidden_act: str = "silu"
    # Attention per layer: "full_attention" or "sliding_attention" (window `sliding_window`).
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int | None = None
    # Sliding-window layers' RoPE, where it differs (Gemma 3's local base).
    rope_theta_sliding: float | None = None
    rope_scaling_sliding: dict[str, Any] | None = None
    query_pre_attn_scalar: float | None = None  # Gemma: softmax scale = this ** -0.5
    attn_logit_softcapping: float | None = None  # Gemma 2
    final_logit_softcapping: float | None = None  # Gemma 2
    # Mixture of experts (Qwen2-MoE, Qwen3-MoE, Mixtral).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def is_sliding(self, layer_idx: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer_idx] == SLIDING

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """The layer's window (its queries see the last `window` positions), or None."""
        return self.sliding_window if self.is_sliding(layer_idx) else None

    def layer_rope(self, layer_idx: int) -> tuple[float, dict[str, Any] | None]:
        if self.is_sliding(layer_idx) and self.rope_theta_sliding is not None:
            return self.rope_theta_sliding, self.rope_scaling_sliding
        return self.rope_theta, self.rope_scaling

    @property
    def attention_scale(self) -> float:
        base = self.query_pre_attn_scalar or self.head_dim
        return float(base) ** -0.5

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        archs = d.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry")

        def need(key: str) -> Any:
            if key not in d or d[key] is None:
                raise ValueError(f"config.json is missing {key!r}")
            return d[key]

        def optional_float(key: str, archs: tuple[str, ...]) -> float | None:
            # Read only for the families whose HF model uses the key (a stray entry in another
            # family's config changes nothing there, so it must not here either).
            value = d.get(key) if arch in archs else None
            return float(value) if value else None

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        arch = archs[0]
        act = _check_supported(arch, d)
        layers = int(need("num_hidden_layers"))
        window = _sliding_window(arch, d)
        layer_types = _layer_types(arch, d, layers, window)
        rope = _rope_by_layer_type(arch, d)
        sliding_rope = rope[SLIDING] if rope[SLIDING] != rope[FULL] else (None, None)
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        dtype_name = d.get("torch_dtype") or d.get("dtype")
        is_qwen = arch.startswith("Qwen2")
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(d.get("intermediate_size") or 0),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope[FULL][0],
            rope_scaling=rope[FULL][1],
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", arch in _TIED_BY_DEFAULT)),
            attention_bias=bool(d.get("attention_bias", d.get("qkv_bias", is_qwen))),
            torch_dtype=_DTYPES.get(str(dtype_name)) if dtype_name else None,
            eos_token_ids=eos_ids,
            bos_token_id=d.get("bos_token_id"),
            hidden_act=act,
            layer_types=layer_types,
            sliding_window=window if SLIDING in layer_types else None,
            rope_theta_sliding=sliding_rope[0],
            rope_scaling_sliding=sliding_rope[1],
            query_pre_attn_scalar=optional_float("query_pre_attn_scalar", _GEMMA),
            # HF's Gemma 3 attention takes no soft-cap even if its config names one.
            attn_logit_softcapping=optional_float("attn_logit_softcapping", _GEMMA[:1]),
            final_logit_softcapping=optional_float("final_logit_softcapping", _GEMMA),
            num_experts=int(d.get("num_experts") or d.get("num_local_experts") or 0),
            num_experts_per_tok=int(d.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(d.get("moe_intermediate_size") or 0),
            shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            decoder_sparse_step=int(d.get("decoder_sparse_step") or 1),
            mlp_only_layers=list(d.get("mlp_only_layers") or []),
            raw=dict(d),
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV bytes per token of context in a cache of `dtype` (the KV cache's: the model's, or
        `torch.float8_e4m3fn`, 1 byte). Sliding-window layers are counted in full: their
        blocks outside the window are not freed (the block manager keeps whole sequences)."""
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * elem

    def expert_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one routed expert (gate, up and down projections) in one layer; 0 if dense.
        Mixtral names its expert size `intermediate_size`, the Qwen MoEs `moe_intermediate_size`."""
        if not self.num_experts:
            return 0
        size = self.moe_intermediate_size or self.intermediate_size
        elem = torch.empty(0, dtype=dtype).element_size()
        return 3 * self.hidden_size * size * elem

    def decode_step_bytes(
        self,
        weights_bytes: int,
        dtype: torch.dtype,
        batch_size: int,
        context_len: float,
        kv_dtype: torch.dtype | None = None,
    ) -> float:
        """Bytes a decode step must read at least: the weights, except the routed experts no
        token of the batch picks, plus each sequence's KV (a sliding-window layer reads only its
        window). With top-k of E experts chosen uniformly, an expert is missed by one token with
        probability 1 - k/E, so the batch reads E * (1 - (1 - k/E) ** batch) experts per layer on
        average: the floor of a MoE at batch 1 is its active parameters, not all of them.
        `kv_dtype` is the KV cache's element type (default `dtype`; an fp8 cache: 1 byte)."""
        per_expert = self.expert_bytes(dtype)
        moe_layers = sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        unread = 0.0
        if per_expert and moe_layers and self.num_experts_per_tok:
            e, k = self.num_experts, self.num_experts_per_tok
            read = e * (1.0 - (1.0 - k / e) ** batch_size)
            unread = moe_layers * (e - read) * per_expert
        elem = torch.empty(0, dtype=kv_dtype or dtype).element_size()
        per_layer_token = 2 * self.num_key_value_heads * self.head_dim * elem
        kv = 0.0
        for i in range(self.num_hidden_layers):
            window = self.layer_sliding_window(i)
            kv += per_layer_token * (min(context_len, window) if window else context_len)
        return weights_bytes - unread + batch_size * kv


def check_parallel_config(mc: ModelConfig, tp: int, pp: int) -> None:
    """A clear ValueError when the model does not split this way (the vocabulary is padded)."""
    problems = []
    if mc.num_attention_heads % tp:
        problems.append(
            f"tensor_parallel_size={tp} does not divide the {mc.num_attention_heads} attention heads"
        )
    kv = mc.num_key_value_heads
    if kv % tp and tp % kv:
        problems.append(
            f"tensor_parallel_size={tp} must divide the {kv} KV heads or be a multiple of them"
        )
    has_dense = mc.num_experts == 0 or any(
        not mc.is_moe_layer(i) for i in range(mc.num_hidden_layers)
    )
    if has_dense and mc.intermediate_size % tp:
        problems.append(
            f"tensor_parallel_size={tp} does not divide intermediate_size={mc.intermediate_size}"
        )
    shared = mc.shared_expert_intermediate_size
    if mc.num_experts and shared % tp:
        problems.append(
            f"tensor_parallel_size={tp} does not divide shared_expert_intermediate_size={shared}"
        )
    if pp > mc.num_hidden_layers:
        problems.append(
            f"pipeline_parallel_size={pp} exceeds the model's {mc.num_hidden_layers} layers"
        )
    if problems:
        raise ValueError(f"{mc.architecture} cannot be split: " + "; ".join(problems))
