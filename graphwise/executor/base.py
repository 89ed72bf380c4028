"""The one interface between the engine and its model runner(s).

The engine never knows whether the model is split: it calls the same methods on an executor of
one process (`UniProcExecutor`) or of a tensor/pipeline-parallel group (`MultiProcExecutor`).
Start-up goes through `collective_rpc` (every rank runs the runner method, results come back
by rank); each step goes through `execute_model`, whose handle's `result()` is the driver
runner's `ModelRunnerOutput`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from graphwise.config import EngineConfig
from graphwise.core.step import GrammarBitmask, SchedulerOutput
from graphwise.models.loader import ModelSource
from graphwise.runner.model_runner import ModelRunner
from graphwise.runner.step_handle import StepHandle


class Executor(ABC):
    # Rank 0's runner, in this process. For insight tools and tests that look inside (explain,
    # the HF comparisons); the engine itself goes through the methods below.
    driver: ModelRunner
    world_size: int = 1

    @property
    def device(self) -> torch.device:
        return self.driver.device

    @abstractmethod
    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Call `ModelRunner.<method>(*args)` on every rank; the results, by rank."""

    @abstractmethod
    def execute_model(self, step: SchedulerOutput) -> StepHandle:
        """Launch one step on every rank; the driver's handle."""

    @abstractmethod
    def sample_deferred(self, grammar: GrammarBitmask) -> StepHandle:
        """Sample the step launched last, whose sampling waited for its grammar mask (every
        rank joins: the sampled tokens are broadcast); the driver's handle."""

    def shutdown(self) -> None:  # noqa: B027 - nothing to stop in one process
        """Stop the workers, if any (also done at exit)."""

    @property
    def alive(self) -> bool:
        return True


class UniProcExecutor(Executor):
    def __init__(self, runner: ModelRunner) -> None:
        self.driver = runner

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.driver, method)(*args)]

    def execute_model(self, step: SchedulerOutput) -> StepHandle:
        return self.driver.execute_model(step)

    def sample_deferred(self, grammar: GrammarBitmask) -> StepHandle:
        return self.driver.sample_deferred(grammar)


def create_executor(
    config: EngineConfig,
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    vocab_limit: int | None = None,
) -> Executor:
    """One process for tensor_parallel_size x pipeline_parallel_size == 1, a group otherwise."""
    if config.tensor_parallel_size * config.pipeline_parallel_size > 1:
        from graphwise.executor.multiproc import MultiProcExecutor

        return MultiProcExecutor.launch(config, source, device, dtype, vocab_limit)
    from graphwise.models.loader import build_model

    model, model_config = build_model(source, config, device, dtype)
    drafter = None
    spec = config.speculative
    if spec is not None and spec.uses_draft_model:  # (TP and PP refuse speculation)
        from graphwise.runner.draft_model import load_draft_model

        drafter = load_draft_model(config, source, model, model_config, device, dtype)
    return UniProcExecutor(
        ModelRunner(
            config, model, model_config, device, dtype, vocab_limit=vocab_limit, drafter=drafter
        )
    )
