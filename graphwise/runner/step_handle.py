"""A launched step's handle: its sampled tokens (and logprobs) reach the host through pinned
copies behind the step and one event, so `result()` waits for that step alone."""

from __future__ import annotations

import torch

from graphwise.core.step import ModelRunnerOutput, SampleLogprobs


def to_pinned(x: torch.Tensor) -> torch.Tensor:
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    return host


class StepHandle:
    """A launched step's output; `result()` waits for its sampled tokens (the step's one host
    sync: pinned copies and an event on CUDA)."""

    def __init__(
        self,
        req_ids: list[str],
        tokens: torch.Tensor | None,
        used_cuda_graph: bool,
        event: torch.cuda.Event | None = None,
        logprobs: tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self._req_ids = req_ids
        self._tokens = tokens
        self._used_graph = used_cuda_graph
        self._event = event
        # (row, k) of the rows that asked, their [R, 1 + K] values and ids (see _logprobs)
        self._logprobs = logprobs

    def result(self) -> ModelRunnerOutput:
        tokens: list[int] = []
        if self._tokens is not None:
            if self._event is not None:
                self._event.synchronize()
            tokens = self._tokens.tolist()
        out = ModelRunnerOutput(self._req_ids, tokens, used_cuda_graph=self._used_graph)
        if self._logprobs is not None:
            rows, values, ids = self._logprobs
            vals, idl = values.tolist(), ids.tolist()
            out.logprobs = [None] * len(tokens)
            for i, (row, k) in enumerate(rows):
                v, t = vals[i], idl[i]
                out.logprobs[row] = SampleLogprobs(v[0], int(t[0]), t[1 : k + 1], v[1 : k + 1])
        return out
