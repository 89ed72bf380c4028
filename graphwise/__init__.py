"""graphwise: an LLM inference engine that runs decode eagerly or as CUDA graphs, and knows why."""

from graphwise.outputs import CompletionOutput, RequestOutput
from graphwise.sampling_params import (
    GuidedDecodingParams,
    ReasoningSpec,
    SamplingParams,
    StructuredOutputsParams,
)

__version__ = "0.1.0"


def __getattr__(name: str):  # keep `import graphwise` light: torch loads on first use of LLM
    if name == "LLM":
        from graphwise.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = [
    "LLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "GuidedDecodingParams",
    "ReasoningSpec",
    "RequestOutput",
    "CompletionOutput",
]
