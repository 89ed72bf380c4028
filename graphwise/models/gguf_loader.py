"""GGUF files: config from the metadata, tensors dequantized with the `gguf` package.

llama.cpp's converter permutes the rows of Llama's q and k projections (interleaved RoPE); we
undo that so the checkpoint matches the HF layout our RoPE expects.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _reader(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


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
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return {
        "architectures": [_ARCHS[arch]],
        "vocab_size": int(vocab),
        "hidden_size": int(_field(reader, f"{arch}.embedding_length")),
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "eos_token_id": None if eos is None else int(eos),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "gguf_architecture": arch,
    }


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_weights(path: Path, config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    import gguf

    reader = _reader(path)
    permute = config.get("gguf_architecture") == "llama"
    for t in reader.tensors:
        name = _GLOBAL_NAMES.get(t.name)
        if name is None:
            parts = t.name.split(".")  # blk.N.kind.weight|bias
            if parts[0] != "blk" or parts[2] not in _LAYER_NAMES:
                raise ValueError(f"GGUF tensor {t.name!r} is not understood")
            name = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
            kind = parts[2]
        else:
            kind = ""
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if permute and kind == "attn_q":
            w = _unpermute(w, config["num_attention_heads"])
        elif permute and kind == "attn_k":
            w = _unpermute(w, config["num_key_value_heads"])
        yield name, torch.from_numpy(np.array(w, copy=True))
