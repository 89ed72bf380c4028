"""Attention: the model-side layer and the backends that run it (torch everywhere, Triton on CUDA)."""

from graphwise.layers.attention.backend import AttentionBackend, AttentionMetadata, ForwardContext
from graphwise.layers.attention.layer import Attention

__all__ = ["Attention", "AttentionBackend", "AttentionMetadata", "ForwardContext"]
