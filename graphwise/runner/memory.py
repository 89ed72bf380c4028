"""How many KV blocks fit: weights, peak activations and graph memory first, the rest to KV."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from graphwise.engine.scheduler import ScheduledBatch
from graphwise.engine.sequence import Sequence
from graphwise.sampling_params import SamplingParams

if TYPE_CHECKING:
    from graphwise.engine.engine import LLMEngine
    from graphwise.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)
CPU_DEFAULT_KV_BYTES = 512 << 20
GRAPH_RESERVE_BYTES = 256 << 20  # held back for CUDA graphs until they are measured


@dataclass
class MemoryPlan:
    num_blocks: int
    block_bytes: int
    kv_bytes: int
    weights_bytes: int
    activation_peak_bytes: int = 0
    graph_reserve_bytes: int = 0
    total_bytes: int = 0
    utilization: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)


def profile_peak_activation(runner: ModelRunner, num_tokens: int) -> int:
    """Run a worst-case prefill (num_tokens in one sequence) and measure the peak allocation."""
    bs = runner.block_size
    blocks = -(-num_tokens // bs)
    runner.allocate_kv_cache(blocks)
    seq = Sequence("profile", None, [0] * num_tokens, SamplingParams(max_tokens=1))
    seq.block_table = list(range(blocks))
    torch.cuda.synchronize(runner.device)
    torch.cuda.reset_peak_memory_stats(runner.device)
    base = torch.cuda.memory_allocated(runner.device)
    runner.execute(ScheduledBatch(seqs=[seq], num_new_tokens=[num_tokens]))
    torch.cuda.synchronize(runner.device)
    peak = torch.cuda.max_memory_allocated(runner.device) - base
    runner.kv_caches = []
    torch.cuda.empty_cache()
    return peak


def plan_kv_blocks(engine: LLMEngine, runner: ModelRunner) -> MemoryPlan:
    cfg = engine.config
    mc = engine.model_config
    block_bytes = mc.kv_bytes_per_token(engine.dtype) * cfg.block_size
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    plan = MemoryPlan(num_blocks=0, block_bytes=block_bytes, kv_bytes=0, weights_bytes=weights)
    if cfg.num_gpu_blocks_override is not None:
        plan.num_blocks = cfg.num_gpu_blocks_override
    elif cfg.kv_cache_memory is not None:
        plan.num_blocks = cfg.kv_cache_memory // block_bytes
    elif engine.device.type != "cuda":
        # CPU: enough for every sequence at full length, capped, but never below one full-length
        # sequence (plus a block of slack).
        per_token = mc.kv_bytes_per_token(engine.dtype)
        want = cfg.max_num_seqs * engine.max_model_len * per_token
        floor = (engine.max_model_len + cfg.block_size) * per_token
        plan.num_blocks = max(min(want, CPU_DEFAULT_KV_BYTES), floor) // block_bytes
    else:
        free, total = torch.cuda.mem_get_info(engine.device)
        plan.total_bytes = total
        plan.utilization = cfg.gpu_memory_utilization
        plan.activation_peak_bytes = profile_peak_activation(runner, engine.max_num_batched_tokens)
        free, total = torch.cuda.mem_get_info(engine.device)
        used = total - free  # weights + CUDA context + anything else on the card
        graphs = 0 if cfg.use_cuda_graph == "off" else GRAPH_RESERVE_BYTES
        plan.graph_reserve_bytes = graphs
        budget = (
            int(total * cfg.gpu_memory_utilization) - used - plan.activation_peak_bytes - graphs
        )
        plan.num_blocks = max(0, budget // block_bytes)
    plan.kv_bytes = plan.num_blocks * block_bytes
    logger.info(
        "Memory: weights %.2f GiB, activation peak %.2f GiB, graph reserve %.2f GiB, "
        "KV cache %.2f GiB = %d blocks = %d tokens",
        weights / 2**30,
        plan.activation_peak_bytes / 2**30,
        plan.graph_reserve_bytes / 2**30,
        plan.kv_bytes / 2**30,
        plan.num_blocks,
        plan.num_blocks * cfg.block_size,
    )
    if plan.num_blocks < 1:
        raise ValueError(
            "no memory is left for the KV cache: raise gpu_memory_utilization or kv_cache_memory"
        )
    return plan
