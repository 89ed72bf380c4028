"""GGUF files: config from the metadata, tensors dequantized with the `gguf` package, or kept
as the file's bytes for the linear layers that run packed (layers/quantization/gguf.py).

The conventions are those of llama.cpp's converter (convert_hf_to_gguf.py), which we undo:
- `llama`: the rows of q and k are permuted (interleaved RoPE); we permute them back.
- `gemma2` / `gemma3`: every norm weight is stored as 1 + w (llama.cpp scales by w); we
  subtract the 1. Gemma's `ffn_norm` is the pre-feed-forward norm, not Llama's post-attention
  one. The softmax scale is not stored: like llama.cpp we take head_dim ** -0.5, or
  (hidden / heads) ** -0.5 for the 27B models (known by their layer count); Gemma 3's local
  RoPE base (10000) and layer pattern (5 sliding, 1 global) are fixed in llama.cpp too.
- `phi3`: q/k/v and gate/up stay fused (`attn_qkv`, `ffn_up` with 2 x intermediate rows);
  LongRoPE's factors are tensors (`rope_factors_long` / `_short`), read into the config.
- `qwen3`: q/k norms are `attn_q_norm` / `attn_k_norm`, head_dim is `attention.key_length`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

_ARCHS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_LAYER_NAMES = {
    "gemma2": _GEMMA_LAYER_NAMES,
    "gemma3": _GEMMA_LAYER_NAMES,
    "phi3": {**_LAYER_NAMES, "ffn_up": "mlp.gate_up_proj"},  # gate and up, fused
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")
# Layer counts of the Gemma 27B models, whose softmax scale llama.cpp takes from hidden / heads.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _reader(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _tensor(reader: Any, name: str) -> np.ndarray | None:
    import gguf

    for t in reader.tensors:
        if t.name == name:
            return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)
    return None


def _arch_config(reader: Any, arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """The entries of config.json that only some architectures have."""
    extra: dict[str, Any] = {}
    window = _field(reader, f"{arch}.attention.sliding_window")
    if arch in ("gemma2", "gemma3"):
        layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
        big = layers == _GEMMA_27B_LAYERS[arch]
        extra["query_pre_attn_scalar"] = (
            config["hidden_size"] // heads if big else config["head_dim"]
        )
        extra["sliding_window"] = int(window) if window else None
        extra["attn_logit_softcapping"] = _field(reader, f"{arch}.attn_logit_softcapping")
        extra["final_logit_softcapping"] = _field(reader, f"{arch}.final_logit_softcapping")
        extra["hidden_activation"] = "gelu_pytorch_tanh"
    if arch == "gemma3":
        # Newer converters may write the local base and the pattern (a period, or one flag per
        # layer); older ones leave them to llama.cpp's built-in 10000 and 6.
        extra["rope_local_base_freq"] = float(_field(reader, "gemma3.rope.freq_base_swa", 1e4))
        pattern = _field(reader, "gemma3.attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):
            kinds = ("full_attention", "sliding_attention")
            extra["layer_types"] = [kinds[bool(flag)] for flag in pattern]
        else:
            extra["sliding_window_pattern"] = int(pattern)
        if _field(reader, "gemma3.rope.scaling.type") == "linear":
            factor = float(_field(reader, "gemma3.rope.scaling.factor"))
            extra["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    if arch == "phi3":
        extra["sliding_window"] = int(window) if window else None
        original = _field(reader, "phi3.rope.scaling.original_context_length")
        extra["original_max_position_embeddings"] = int(
            original or config["max_position_embeddings"]
        )
        long, short = (_tensor(reader, name) for name in _ROPE_FACTORS)
        if long is not None and short is not None:
            extra["rope_scaling"] = {
                "rope_type": "longrope",
                "long_factor": long.tolist(),
                "short_factor": short.tolist(),
            }
            attention = _field(reader, "phi3.rope.scaling.attn_factor")
            if attention is not None:
                extra["rope_scaling"]["attention_factor"] = float(attention)
    return extra


def gguf_has_tokenizer(path: Path) -> bool:
    return "tokenizer.ggml.model" in _reader(path).fields


def gguf_config(path: Path) -> dict[str, Any]:
    """An HF-style config.json dict built from the GGUF metadata."""
    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(_ARCHS)})"
        )
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    config: dict[str, Any] = {
        "architectures": [_ARCHS[arch]],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "eos_token_id": None if eos is None else int(eos),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "gguf_architecture": arch,
    }
    base = _field(reader, f"{arch}.rope.freq_base")
    if base is not None:
        config["rope_theta"] = float(base)
    config.update(_arch_config(reader, arch, config))
    return config


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str, layer_names: dict[str, str]) -> tuple[str, str]:
    """(HF checkpoint name, GGUF layer kind or "") of a GGUF tensor name."""
    name = _GLOBAL_NAMES.get(gguf_name)
    if name is not None:
        return name, ""
    parts = gguf_name.split(".")  # blk.N.kind.weight|bias
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in layer_names:
        raise ValueError(f"GGUF tensor {gguf_name!r} is not understood")
    return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{parts[3]}", parts[2]


def gguf_tensor_types(path: Path, config: dict[str, Any]) -> dict[str, str]:
    """HF name -> GGUF type name ("Q4_K", "F32", ...) of every 2-D tensor of the file: what a
    quantization config needs to choose which linear layers stay packed."""
    reader = _reader(path)
    layer_names = _ARCH_LAYER_NAMES.get(str(config.get("gguf_architecture")), _LAYER_NAMES)
    types: dict[str, str] = {}
    for t in reader.tensors:
        if t.name in _ROPE_FACTORS or len(t.shape) != 2:
            continue
        types[_hf_name(t.name, layer_names)[0]] = t.tensor_type.name
    return types


def gguf_weights(
    path: Path, config: dict[str, Any], packed: Collection[str] = ()
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of the file: dequantized to fp32, except the names in
    `packed`, which come as the file's bytes, uint8 [rows, bytes per row] (a packed linear
    layer reads them as they are; llama's q/k row permutation is undone on whole rows)."""
    import gguf

    reader = _reader(path)
    arch = config.get("gguf_architecture")
    permute = arch == "llama"
    norm_shift = arch in ("gemma2", "gemma3")
    layer_names = _ARCH_LAYER_NAMES.get(str(arch), _LAYER_NAMES)
    for t in reader.tensors:
        if t.name in _ROPE_FACTORS:
            continue  # read into the config by gguf_config
        name, kind = _hf_name(t.name, layer_names)
        if name in packed:
            w = np.asarray(t.data)  # uint8 [rows, bytes per row]
        else:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        if permute and kind == "attn_q":
            w = _unpermute(w, config["num_attention_heads"])
        elif permute and kind == "attn_k":
            w = _unpermute(w, config["num_key_value_heads"])
        elif norm_shift and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w)
        yield name, torch.from_numpy(np.array(w, copy=True))
