"""StepHandle.result(): the numbers a launched step returns, graph or eager, with or without
logprobs (a graph step's flag once landed in the logprobs field: only a GPU run showed it)."""

from __future__ import annotations

import pytest
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


def test_verify_logprobs_land_on_their_rows_cut_to_the_emitted_tokens():
    """A verify row computed k + 1 entries; only those of the tokens it emitted come back (the
    rest were past its first rejected draft), and rows that did not ask get None."""
    emitted = torch.tensor([[4, 9, -1], [6, 2, 8]])  # row 0: 1 accepted + 1; row 1: all 3
    values = torch.tensor([[-0.1 * i, -0.2] for i in range(6)])
    ids = torch.tensor([[i + 1, 30 + i] for i in range(6)])
    handle = StepHandle(
        ["a", "b", "c"],
        torch.tensor([9, 5, 8]),
        used_cuda_graph=False,
        spec=([0, 2], emitted),
        spec_logprobs=([(0, 3, 1), (2, 3, 0)], values, ids),
    )
    out = handle.result()
    assert out.spec_token_ids == [[4, 9], [5], [6, 2, 8]]
    assert out.spec_logprobs is not None and out.spec_logprobs[1] is None
    row0, row2 = out.spec_logprobs[0], out.spec_logprobs[2]
    assert [e.rank for e in row0] == [1, 2] and [e.top_ids for e in row0] == [[30], [31]]
    assert [e.logprob for e in row0] == pytest.approx([0.0, -0.1])
    assert [e.rank for e in row2] == [4, 5, 6] and all(e.top_ids == [] for e in row2)
