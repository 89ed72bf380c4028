"""A launched step's handle: its sampled tokens (and logprobs) reach the host through pinned
copies behind the step and one event, so `result()` waits for that step alone."""

from __future__ import annotations

from collections.abc import Callable

import torch

from graphwise.core.step import ModelRunnerOutput, PromptLogprobs, SampleLogprobs

# Prompt logprobs of a step: (request id, first position, positions, k) per asking row, and the
# [M, 1 + K] values and ids of all their positions in that order (runner/logprobs.py).
PromptParts = tuple[list[tuple[str, int, int, int]], torch.Tensor, torch.Tensor]
# Logprobs of a verify step's asking rows: (sampled row, positions, k) per row, and the
# [P, 1 + K] values and ids of all their positions (each row's k + 1), row by row.
SpecLogprobParts = tuple[list[tuple[int, int, int]], torch.Tensor, torch.Tensor]


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
        prompt: PromptParts | None = None,
        spec: tuple[list[int], torch.Tensor] | None = None,
        spec_logprobs: SpecLogprobParts | None = None,
    ) -> None:
        self._req_ids = req_ids
        self._tokens = tokens
        self._used_graph = used_cuda_graph
        self._event = event
        # (row, k) of the rows that asked, their [R, 1 + K] values and ids (see _logprobs)
        self._logprobs = logprobs
        self._prompt = prompt
        # A verify step's rows with drafts and their [S, K + 1] emitted tokens (-1 padded).
        self._spec = spec
        self._spec_logprobs = spec_logprobs

    def result(self) -> ModelRunnerOutput:
        tokens: list[int] = []
        if self._event is not None:
            self._event.synchronize()
        if self._tokens is not None:
            tokens = self._tokens.tolist()
        out = ModelRunnerOutput(self._req_ids, tokens, used_cuda_graph=self._used_graph)
        if self._logprobs is not None:
            rows, values, ids = self._logprobs
            vals, idl = values.tolist(), ids.tolist()
            out.logprobs = [None] * len(tokens)
            for i, (row, k) in enumerate(rows):
                v, t = vals[i], idl[i]
                out.logprobs[row] = SampleLogprobs(v[0], int(t[0]), t[1 : k + 1], v[1 : k + 1])
        if self._prompt is not None:
            out.prompt_logprobs = _prompt_entries(*self._prompt)
        if self._spec is not None:
            rows, emitted = self._spec
            out.spec_token_ids = [[t] for t in tokens]
            for row, values in zip(rows, emitted.tolist(), strict=True):
                out.spec_token_ids[row] = [t for t in values if t >= 0]
            if self._spec_logprobs is not None:
                out.spec_logprobs = _spec_entries(out.spec_token_ids, *self._spec_logprobs)
        return out


class FinishOnResult(StepHandle):
    """The handle of a launched pipeline micro-batch: it is sampled when its result is asked
    for (`finish` makes the sampled step's own handle), after the next batch was launched."""

    def __init__(self, finish: Callable[[], StepHandle]) -> None:  # noqa: D107
        self._finish = finish

    def result(self) -> ModelRunnerOutput:
        return self._finish().result()


def _spec_entries(
    token_ids: list[list[int]],
    rows: list[tuple[int, int, int]],
    values: torch.Tensor,
    ids: torch.Tensor,
) -> list[list[SampleLogprobs] | None]:
    """Per sampled row, the entries of the tokens it emitted (a verify row computed one per
    position; those past its first rejected draft's have no token and are dropped)."""
    vals, idl = values.tolist(), ids.tolist()
    out: list[list[SampleLogprobs] | None] = [None] * len(token_ids)
    at = 0
    for row, count, k in rows:
        emitted = len(token_ids[row])
        out[row] = [
            SampleLogprobs(v[0], int(t[0]), t[1 : k + 1], v[1 : k + 1])
            for v, t in zip(vals[at : at + emitted], idl[at : at + emitted], strict=True)
        ]
        at += count
    return out


def _prompt_entries(
    rows: list[tuple[str, int, int, int]], values: torch.Tensor, ids: torch.Tensor
) -> dict[str, PromptLogprobs]:
    vals, idl = values.tolist(), ids.tolist()
    out: dict[str, PromptLogprobs] = {}
    at = 0
    for rid, start, count, k in rows:
        v, t = vals[at : at + count], idl[at : at + count]
        at += count
        out[rid] = PromptLogprobs(
            start,
            [x[0] for x in v],
            [int(x[0]) for x in t],
            [x[1 : k + 1] for x in t],
            [x[1 : k + 1] for x in v],
        )
    return out
