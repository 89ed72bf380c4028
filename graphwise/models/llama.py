"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral with its sliding window) and Qwen2 (QKV
bias): the base the other families subclass.

Forward works on a flat batch: all sequences' new tokens concatenated ([T] ids, [T] positions),
with the per-sequence structure carried by the attention metadata in the ForwardContext.

Hooks for the subclasses (class attributes and small methods, no copies of forward):
`SelfAttention.qk_norm` (per-head q/k RMSNorm before RoPE: Qwen3, Gemma 3),
`DecoderLayer.make_mlp` / `attention_cls` / `norm_cls` (MoE, GeGLU, Gemma),
`LlamaModel.layer_cls` / `norm_cls` / `scale_embeddings` (Gemma), `LlamaForCausalLM.model_cls`
and `map_weight` (checkpoint names). Per-layer attention settings (sliding window, soft-cap,
scale, RoPE base) come from ModelConfig.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from graphwise.distributed import parallel_state
from graphwise.layers import ops
from graphwise.layers.attention import Attention, ForwardContext
from graphwise.layers.attention.kv_cache_dtype import kv_scale_target, scale_value
from graphwise.layers.linear import (
    ColumnParallelLinear,
    Linear,
    PackedLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from graphwise.layers.mlp import MLP
from graphwise.layers.norm import RMSNorm
from graphwise.layers.rotary import get_rotary
from graphwise.models.model_config import ModelConfig

# HF checkpoint name -> (our packed module, shard)
PACKED_SHARDS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}
SHARD_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "gate": "gate_proj", "up": "up_proj"}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


class SelfAttention(nn.Module):
    # Per-head RMSNorm of q and k before RoPE (Qwen3: RMSNorm, Gemma 3: GemmaRMSNorm).
    qk_norm: type[RMSNorm] | None = None

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        tp = parallel_state.current()
        kv_part = parallel_state.kv_head_part(cfg.num_key_value_heads, tp.tp_rank, tp.tp_size)
        self.num_heads = cfg.num_attention_heads // tp.tp_size
        self.num_kv_heads = cfg.num_key_value_heads // kv_part[1]
        self.head_dim = cfg.head_dim
        q_size = cfg.num_attention_heads * self.head_dim
        kv_size = cfg.num_key_value_heads * self.head_dim
        self.qkv_proj = PackedLinear(
            cfg.hidden_size,
            {"q": q_size, "k": kv_size, "v": kv_size},
            bias=cfg.attention_bias,
            shard_parts={"q": (tp.tp_rank, tp.tp_size), "k": kv_part, "v": kv_part},
        )
        # Qwen2's attention_bias means q/k/v biases only; elsewhere o_proj has one too.
        o_bias = cfg.attention_bias and not cfg.architecture.startswith("Qwen2")
        self.o_proj = RowParallelLinear(q_size, cfg.hidden_size, bias=o_bias)
        theta, scaling = cfg.layer_rope(layer_idx)
        self.rotary = get_rotary(self.head_dim, cfg.max_position_embeddings, theta, scaling)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if self.qk_norm is not None:
            self.q_norm = self.qk_norm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = self.qk_norm(self.head_dim, cfg.rms_norm_eps)
        self.attn = Attention(
            layer_idx,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            scale=cfg.attention_scale,
            sliding_window=cfg.layer_sliding_window(layer_idx),
            softcap=cfg.attn_logit_softcapping,
        )

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.q_norm is not None and self.k_norm is not None:
            ops.head_rmsnorm_(
                qkv,
                self.q_norm.weight,
                self.k_norm.weight,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                self.q_norm.eps,
                self.q_norm.gemma,
            )
        q, k, v = ops.rope_qkv(
            qkv,
            positions,
            self.rotary.cos_sin_cache,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        out = self.attn(q, k, v, ctx)
        return self.o_proj(out.reshape(T, -1))


class DecoderLayer(nn.Module):
    attention_cls: type[SelfAttention] = SelfAttention
    norm_cls: type[RMSNorm] = RMSNorm

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(cfg, layer_idx)
        self.mlp = self.make_mlp(cfg, layer_idx)
        self.input_layernorm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps)

    def make_mlp(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        return MLP(cfg.hidden_size, cfg.intermediate_size, hidden_act=cfg.hidden_act)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add is fused into the next norm: each layer returns (delta, residual).
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, ctx)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class PPMissingLayer(nn.Module):
    """Stands in for a decoder layer another pipeline stage runs (keeps layer indices)."""

    def forward(self, *args: object) -> None:
        raise RuntimeError("this decoder layer runs on another pipeline stage")


class LlamaModel(nn.Module):
    """With pipeline parallelism a stage builds only its layers (the others are PPMissingLayer);
    the first stage owns the embedding, the last the final norm. A stage that is not the last
    returns (hidden, residual) for the next one, which passes them back in as `intermediate`."""

    layer_cls: type[DecoderLayer] = DecoderLayer
    norm_cls: type[RMSNorm] = RMSNorm
    scale_embeddings = False  # Gemma: embeddings times sqrt(hidden_size)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ctx = parallel_state.current()
        # HF rounds sqrt(hidden) to the model dtype (the default dtype while the model is
        # built) before multiplying: sqrt(3584) = 59.87 is 60.0 in bf16.
        scale = torch.tensor(cfg.hidden_size**0.5, dtype=torch.float32, device="cpu")
        self.embed_multiplier = float(scale.to(torch.get_default_dtype()))
        self.start_layer, self.end_layer = parallel_state.stage_layers(
            cfg.num_hidden_layers, ctx.pp_rank, ctx.pp_size
        )
        self.embed_tokens: nn.Module | None = None
        if ctx.is_first_stage:
            if ctx.tp_size == 1:
                self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
                self.embed_tokens.weight.requires_grad_(False)
            else:
                self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [
                self.layer_cls(cfg, i)
                if self.start_layer <= i < self.end_layer
                else PPMissingLayer()
                for i in range(cfg.num_hidden_layers)
            ]
        )
        self.stage_layers = list(self.layers)[self.start_layer : self.end_layer]
        self.norm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps) if ctx.is_last_stage else None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: ForwardContext,
        intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        residual: torch.Tensor | None = None
        if intermediate is None:
            assert self.embed_tokens is not None
            x = self.embed_tokens(input_ids)
            if self.scale_embeddings:
                x = x * self.embed_multiplier
        else:
            x, residual = intermediate
        for layer in self.stage_layers:
            x, residual = layer(positions, x, residual, ctx)
        if self.norm is None:
            assert residual is not None
            return x, residual
        if residual is None:
            return self.norm(x)
        x, _ = self.norm(x, residual)
        return x

    def owns(self, name: str) -> bool:
        """Whether checkpoint tensor `name` belongs on this pipeline stage."""
        m = _LAYER_NAME.match(name)
        if m:
            return self.start_layer <= int(m.group(1)) < self.end_layer
        if name.startswith(("model.embed_tokens.", "lm_head.")):
            return self.embed_tokens is not None  # stage 0 computes the logits too
        if name.startswith("model.norm."):
            return self.norm is not None
        return True


class LlamaForCausalLM(nn.Module):
    model_cls: type[LlamaModel] = LlamaModel

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        ctx = parallel_state.current()
        self.tp_size = ctx.tp_size
        self.pp_size = ctx.pp_size
        self.model = self.model_cls(cfg)
        # Pipeline parallelism: the last stage sends the final hidden rows back to stage 0, which
        # holds the LM head (tied to the embedding or not) and samples.
        self.lm_head: Linear | None = None
        if ctx.is_first_stage:
            self.lm_head = (
                Linear(cfg.hidden_size, cfg.vocab_size)
                if ctx.tp_size == 1
                else ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size)
            )
            if cfg.tie_word_embeddings:
                assert self.model.embed_tokens is not None
                self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: ForwardContext,
        intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.model(input_ids, positions, ctx, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, vocab] float32 logits. With TP every rank of stage 0 calls this; TP rank 0 gets
        the whole vocabulary, the others None."""
        assert self.lm_head is not None, "the logits are computed on pipeline stage 0"
        if self.tp_size == 1:
            return self.softcap_logits(self.lm_head(hidden).float())
        logits = parallel_state.gather_vocab_shards(self.lm_head(hidden), self.config.vocab_size)
        return None if logits is None else self.softcap_logits(logits.float())  # type: ignore[return-value]

    def softcap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Gemma 2's final soft-cap, cap * tanh(logits / cap) (in fp32 here, where HF works in
        the model dtype: identical in fp32, a little more precise in bf16)."""
        cap = self.config.final_logit_softcapping
        if not cap:
            return logits
        return torch.tanh(logits / cap) * cap

    # ---- weights ----------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into the packed parameters; returns the names of
        parameters that were loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if self.pp_size > 1 and not self.model.owns(name):
                continue  # another pipeline stage holds it
            target = kv_scale_target(name)
            if target is not None:  # an FP8 KV cache's scale: the attention layer keeps it
                self.set_kv_scales(name, tensor, *target)
                continue
            loaded.update(self.map_weight(name, tensor, params))
        return loaded

    def set_kv_scales(
        self, name: str, tensor: torch.Tensor, layer: int, which: tuple[str, ...]
    ) -> None:
        """Checkpoint scale `name` into layer `layer`'s attention (vLLM's names, see
        layers/attention/kv_cache_dtype.py). They are plain floats: a CUDA graph captures them
        as constants, and TP ranks all use the one per-tensor value."""
        try:
            attn = self.get_submodule(f"model.layers.{layer}.self_attn.attn")
        except AttributeError:
            raise ValueError(
                f"checkpoint tensor {name!r} has no place in {type(self).__name__}"
            ) from None
        value = scale_value(name, tensor)
        for w in which:
            attn.set_kv_scale(w, value)

    def map_weight(
        self, name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter]
    ) -> list[str]:
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in PACKED_SHARDS:
            module_name, shard = PACKED_SHARDS[parts[-2]]
            packed_name = ".".join(parts[:-2] + [module_name])
            module = self.get_submodule(packed_name)
            assert isinstance(module, PackedLinear)
            load_linear(module, name, tensor, shard)
            return [f"{packed_name}.{parts[-1]}:{shard}"]
        module_name, _, leaf = name.rpartition(".")
        try:
            owner = self.get_submodule(module_name) if module_name else None
        except AttributeError:
            owner = None
        if isinstance(owner, Linear):  # weights, biases, scales: the layer's method places them
            load_linear(owner, name, tensor, None)
            return [name]
        if name not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
        param = params[name]
        module_name, _, leaf = name.rpartition(".")
        tp_slice = getattr(self.get_submodule(module_name), "tp_slice", None)
        if tp_slice is not None:  # tensor parallelism: this rank's part of the tensor
            tensor = tp_slice(leaf, tensor)
        if param.shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(param.shape)}"
            )
        param.data.copy_(tensor)
        return [name]

    def checkpoint_names(self, module_name: str, layer: Linear) -> list[str]:
        """The checkpoint names of the projections a linear layer holds (for quantization
        formats that choose by name)."""
        if isinstance(layer, PackedLinear):
            parent = module_name.rpartition(".")[0]
            return [f"{parent}.{SHARD_NAMES.get(s, s)}" for s in layer.shard_offsets]
        return [module_name]

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under HF checkpoint names, packed tensors split back (views, no copies):
        lets HF transformers run on exactly the weights we run, e.g. dummy ones."""
        out: dict[str, torch.Tensor] = {}
        for pname, param in self.named_parameters():
            module_name, _, leaf = pname.rpartition(".")
            module = self.get_submodule(module_name)
            if isinstance(module, PackedLinear):
                prefix = module_name.rsplit(".", 1)[0]
                for shard, (offset, size) in module.shard_offsets.items():
                    out[f"{prefix}.{SHARD_NAMES[shard]}.{leaf}"] = param.data[
                        offset : offset + size
                    ]
            else:
                out[pname] = param.data
        if self.config.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out

    def expected_weights(self) -> set[str]:
        """Names load_weights must report for a complete checkpoint."""
        names: set[str] = set()
        owned: set[str] = set()  # parameters of linear layers: their method names the tensors
        for module_name, module in self.named_modules():
            if not isinstance(module, Linear):
                continue
            for leaf in module.checkpoint_leaves():
                if isinstance(module, PackedLinear):
                    names.update(f"{module_name}.{leaf}:{s}" for s in module.shard_offsets)
                else:
                    names.add(f"{module_name}.{leaf}")
            owned.update(f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False))
        for pname, _ in self.named_parameters():
            if pname not in owned:
                names.add(pname)
        if self.config.tie_word_embeddings:
            names.discard("lm_head.weight")
        return names


def load_linear(layer: Linear, name: str, tensor: torch.Tensor, shard: str | None) -> None:
    """Checkpoint tensor `name` into a linear layer (errors name the tensor)."""
    leaf = name.rpartition(".")[2]
    if leaf not in layer.checkpoint_leaves():
        raise ValueError(
            f"checkpoint tensor {name!r} has no place in a {layer.quant_method.name} "
            f"{type(layer).__name__}"
        )
    try:
        layer.load_checkpoint(leaf, tensor, shard)
    except ValueError as exc:
        raise ValueError(f"checkpoint tensor {name!r}: {exc}") from exc


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5: the Llama layout with biases on q, k and v."""
