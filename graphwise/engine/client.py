"""EngineClient: what the offline API and the server need of an engine, and nothing more.

Implemented by `LLMEngine` (one engine in this process) and `DataParallelEngine` (a front over
several engine processes). Everything a caller reads comes through these methods; `get_stats()`
is a snapshot of numbers, so metrics never reach into an engine's parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from graphwise.config import EngineConfig
from graphwise.engine.validation import RequestLimits
from graphwise.models.model_config import ModelConfig
from graphwise.outputs import RequestOutput
from graphwise.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prompt_tokens: int = 0  # prompt tokens computed (prefill)
    generation_tokens: int = 0
    steps: int = 0
    steps_graph: int = 0  # steps whose forward replayed a CUDA graph
    steps_eager: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # blocks looked up in the prefix cache
    prefix_cache_hits: int = 0
    # Speculative decoding (vLLM's spec_decode_* counters): verify rows, draft tokens
    # proposed, draft tokens accepted.
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def spec_decode_acceptance_rate(self) -> float:
        """Accepted draft tokens over proposed ones (0 without speculation)."""
        n = self.spec_decode_num_draft_tokens
        return self.spec_decode_num_accepted_tokens / n if n else 0.0

    @property
    def spec_decode_mean_accepted_tokens(self) -> float:
        """Tokens a verify row emits on average: 1 + its accepted drafts (vLLM's mean
        acceptance length; 0 without speculation)."""
        n = self.spec_decode_num_drafts
        return 1 + self.spec_decode_num_accepted_tokens / n if n else 0.0

    @classmethod
    def total(cls, parts: list[EngineStats]) -> EngineStats:
        """The sum over several engines (data parallelism)."""
        fields = cls.__dataclass_fields__
        return cls(**{f: sum(getattr(p, f) for p in parts) for f in fields})


class EngineClient(Protocol):
    config: EngineConfig
    model_name: str
    model_config: ModelConfig  # the whole model's (not a shard's)
    max_model_len: int
    request_limits: RequestLimits  # what admission checks requests against
    tokenizer: Any  # None for dummy weights without a tokenizer

    def tokenize(self, prompt: str) -> list[int]: ...

    def add_request(
        self,
        prompt: str | None,
        sampling_params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises InvalidRequest (a ValueError) for bad input."""
        ...

    def abort_request(self, request_id: str) -> bool: ...

    def step(self) -> list[RequestOutput]:
        """Advance; the outputs that are ready (finished requests carry everything)."""
        ...

    def drain(self) -> list[RequestOutput]:
        """Resolve what is still in flight once no request is left."""
        ...

    def has_unfinished_requests(self) -> bool: ...

    @property
    def alive(self) -> bool:
        """False once the engine cannot run anything more (its workers or replicas are gone)."""
        ...

    def get_stats(self) -> EngineStats: ...

    def reset_prefix_cache(self) -> int: ...

    def shutdown(self) -> None: ...


def create_engine_client(config: EngineConfig) -> EngineClient:
    """An LLMEngine, or a DataParallelEngine front when data_parallel_size > 1."""
    if config.data_parallel_size > 1:
        from graphwise.engine.data_parallel import DataParallelEngine

        return DataParallelEngine(config)
    from graphwise.engine.engine import LLMEngine

    return LLMEngine(config)
