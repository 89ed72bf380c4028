"""StepHandle.result(): the numbers a launched step returns, graph or eager, with or without
logprobs (a graph step's flag once landed in the logprobs field: only a GPU run showed it)."""

from __future__ import annotations

import torch

from graphwise.runner.step_handle import StepHandle


def test_graph_step_without_logprobs_keeps_its_fields_apart():
    out = StepHandle(["a", "b"], torch.tensor([5, 7]), used_cuda_graph=True).result()
    assert out.req_ids == ["a", "b"]
    assert out.sampled_token_ids == [5, 7]
    assert out.used_cuda_graph is True
    assert out.logprobs == [] and out.errors == {}


def test_logprobs_land_on_their_rows():
    values = torch.tensor([[-0.5, -0.5, -1.5]])
    ids = torch.tensor([[7, 7, 3]])
    handle = StepHandle(
        ["a", "b"], torch.tensor([5, 7]), used_cuda_graph=False, logprobs=([(1, 2)], values, ids)
    )
    out = handle.result()
    assert out.used_cuda_graph is False
    assert out.logprobs[0] is None
    lp = out.logprobs[1]
    assert lp is not None and lp.logprob == -0.5 and lp.rank == 7
    assert lp.top_ids == [7, 3] and lp.top_logprobs == [-0.5, -1.5]
