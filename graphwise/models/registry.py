"""Model classes keyed by the `architectures` entry of config.json."""

from __future__ import annotations

from torch import nn

from graphwise.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from graphwise.models.llama import LlamaForCausalLM, Qwen2ForCausalLM
from graphwise.models.mixtral import MixtralForCausalLM
from graphwise.models.phi3 import Phi3ForCausalLM
from graphwise.models.qwen2_moe import Qwen2MoeForCausalLM
from graphwise.models.qwen3 import Qwen3ForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    # Mistral is the Llama layout; its sliding window comes from the config (every layer).
    "MistralForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
}

# Architectures people ask for that are close to a supported one but differ in ways we do not
# implement: the error says why instead of only listing what is supported.
_NOT_SUPPORTED_BECAUSE = {
    "Gemma3ForConditionalGeneration": "the multimodal Gemma 3 (vision tower) is not supported; "
    "a text-only Gemma3ForCausalLM checkpoint is",
    "GemmaForCausalLM": "Gemma 1 is not supported (Gemma 2 and 3 are)",
    "Phi3SmallForCausalLM": "Phi-3-small (blocksparse attention, gegelu) is not supported",
    "PhiMoEForCausalLM": "Phi-3.5-MoE is not supported",
    "MinistralForCausalLM": "Ministral (per-layer sliding windows under the Mistral name) is "
    "not supported",
}


def resolve_model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        reason = _NOT_SUPPORTED_BECAUSE.get(architecture)
        raise ValueError(
            f"architecture {architecture!r} is not supported"
            + (f" ({reason})" if reason else "")
            + f"; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        ) from None
