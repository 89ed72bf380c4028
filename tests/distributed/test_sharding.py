"""Single-process pieces of TP/PP: layer sharding, checkpoint slicing, checks."""

from __future__ import annotations

import pytest
import torch

from graphwise.distributed import parallel_state
from graphwise.distributed.launcher import check_device_count
from graphwise.distributed.parallel_state import ParallelContext, kv_head_part
from graphwise.layers.linear import (
    ColumnParallelLinear,
    PackedLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from graphwise.models.model_config import ModelConfig, check_parallel_config
from graphwise.runner.model_runner import local_model_config


def _ctx(tp_rank: int, tp_size: int, pp_rank: int = 0, pp_size: int = 1) -> ParallelContext:
    return ParallelContext(tp_rank, tp_size, pp_rank, pp_size)


def test_rank_layout_and_stage_split():
    ctx = ParallelContext.from_rank(5, tp_size=2, pp_size=3)
    assert (ctx.tp_rank, ctx.pp_rank, ctx.rank) == (1, 2, 5)
    assert ctx.is_last_stage and not ctx.is_first_stage
    assert ctx.stage_rank(0) == 1
    for layers, pp in [(2, 2), (5, 2), (8, 3), (28, 4), (3, 3)]:
        ranges = [parallel_state.stage_layers(layers, r, pp) for r in range(pp)]
        assert ranges[0][0] == 0 and ranges[-1][1] == layers
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        sizes = [e - s for s, e in ranges]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes)  # extra layers go last


def test_current_context_is_single_device_outside_building():
    assert parallel_state.current() == parallel_state.SINGLE
    with parallel_state.building(_ctx(1, 2)):
        layer = RowParallelLinear(8, 4)
        assert parallel_state.current().tp_rank == 1
    assert parallel_state.current() == parallel_state.SINGLE
    assert layer.in_features == 4 and layer.tp_size == 2
    assert RowParallelLinear(8, 4).tp_size == 1


def test_kv_heads_split_or_replicate():
    assert [kv_head_part(8, r, 4) for r in range(4)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    # 2 KV heads on 4 ranks: ranks 0, 1 share head 0; ranks 2, 3 share head 1.
    assert [kv_head_part(2, r, 4) for r in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [kv_head_part(1, r, 2) for r in range(2)] == [(0, 1), (0, 1)]


def test_sharded_linears_reassemble_the_full_product():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    w_qkv = {"q": torch.randn(8, 8), "k": torch.randn(4, 8), "v": torch.randn(4, 8)}
    full_qkv = torch.cat(list(w_qkv.values())) @ x.T
    w_o = torch.randn(6, 8)
    q_parts, o_sum = [], torch.zeros(3, 6)
    for rank in range(2):
        with parallel_state.building(_ctx(rank, 2)):
            qkv = PackedLinear(
                8,
                {"q": 8, "k": 4, "v": 4},
                shard_parts={"q": (rank, 2), "k": (rank, 2), "v": (rank, 2)},
            )
            o = RowParallelLinear(8, 6)
        for name, w in w_qkv.items():
            qkv.load_shard(name, w)
        o.weight.data.copy_(o.tp_slice("weight", w_o))
        q_parts.append(qkv(x)[:, :4])
        o_sum += torch.nn.functional.linear(x[:, rank * 4 : (rank + 1) * 4], o.weight)
    assert torch.allclose(torch.cat(q_parts, dim=1), full_qkv.T[:, :8], atol=1e-6)
    assert torch.allclose(o_sum, x @ w_o.T, atol=1e-5)


def test_packed_linear_checks_the_full_checkpoint_rows():
    layer = PackedLinear(4, {"gate": 6, "up": 6}, shard_parts={"gate": (1, 2), "up": (1, 2)})
    assert layer.out_features == 6
    with pytest.raises(ValueError, match="expected 6 rows"):
        layer.load_shard("gate", torch.zeros(3, 4))
    with pytest.raises(ValueError, match="do not split"):
        PackedLinear(4, {"q": 6}, shard_parts={"q": (0, 4)})


def test_vocab_shards_are_padded_and_embedding_lookups_assemble():
    weight = torch.randn(10, 4)  # 10 rows over 4 ranks: 3 each, the last holds 1 + 2 padding
    head_rows, emb_rows = [], []
    ids = torch.tensor([0, 3, 9, 5])
    total = torch.zeros(4, 4)
    for rank in range(4):
        with parallel_state.building(_ctx(rank, 4)):
            head = ColumnParallelLinear(4, 10)
            emb = VocabParallelEmbedding(10, 4)
        head.weight.data.copy_(head.tp_slice("weight", weight))
        emb.weight.data.copy_(emb.tp_slice("weight", weight))
        head_rows.append(head.weight.data)
        emb_rows.append(emb.weight.data)
        local = ids - emb.vocab_start
        outside = (local < 0) | (local >= emb.rows)
        part = torch.nn.functional.embedding(local.masked_fill(outside, 0), emb.weight)
        total += part.masked_fill(outside.unsqueeze(-1), 0.0)
    assert head_rows[-1].shape == (3, 4) and torch.all(head_rows[-1][1:] == 0)
    assert torch.equal(torch.cat(head_rows)[:10], weight)
    assert torch.equal(total, weight[ids])  # what the all-reduce would sum


def test_local_model_config_has_this_ranks_heads():
    mc = ModelConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 100,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
        }
    )
    local = local_model_config(mc, _ctx(3, 4))
    assert (local.num_attention_heads, local.num_key_value_heads) == (2, 1)
    assert local.num_hidden_layers == 4 and local.head_dim == 8
    check_parallel_config(mc, 4, 4)
    with pytest.raises(ValueError, match="does not divide the 8 attention heads"):
        check_parallel_config(mc, 3, 1)
    with pytest.raises(ValueError, match="exceeds the model's 4 layers"):
        check_parallel_config(mc, 1, 5)
    with pytest.raises(ValueError, match="KV heads"):
        check_parallel_config(
            dataclass_replace(mc, num_key_value_heads=6, num_attention_heads=12), 4, 1
        )


def dataclass_replace(mc: ModelConfig, **kw: int) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(mc, **kw)


def test_device_count_check():
    check_device_count(8, torch.device("cpu"), available=0)
    check_device_count(2, torch.device("cuda"), available=2)
    with pytest.raises(ValueError, match="2 ranks need 2 GPUs .* but 1 are visible"):
        check_device_count(2, torch.device("cuda"), available=1)
    with pytest.raises(ValueError, match="from cuda:1"):
        check_device_count(2, torch.device("cuda", 1), available=2)
