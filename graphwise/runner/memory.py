"""How many KV blocks fit: weights, peak activations and graph memory first, the rest to KV.

On CUDA the budget is `total x gpu_memory_utilization`; from it come, in order: what is already
resident (weights, plus "other": the CUDA context, cuBLAS workspaces, anything else on the card),
the activation peak of a worst-case prefill (profiled), the CUDA-graph pool (measured by capturing
the buckets that will be kept, see runner/graph_policy.py), and the rest is the KV pool.
`kv_cache_memory` (bytes) or `num_gpu_blocks_override` fix the KV pool instead.

Each rank plans with its own numbers (its shard's weights and KV heads, its own card); the
engine allocates the smallest pool any rank can hold.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from graphwise.core.step import NewRequest, ScheduledRow, SchedulerOutput
from graphwise.sampling_params import SamplingParams

if TYPE_CHECKING:
    from graphwise.config import RunnerLimits
    from graphwise.runner.graph_policy import GraphPlan
    from graphwise.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)
CPU_DEFAULT_KV_BYTES = 512 << 20
GRAPH_RESERVE_BYTES = 256 << 20  # held back for CUDA graphs until they are measured


@dataclass
class MemoryPlan:
    """Bytes per component and the KV capacity they leave (`as_dict` is the structured summary)."""

    num_blocks: int
    block_bytes: int
    kv_bytes: int
    weights_bytes: int
    activation_peak_bytes: int = 0
    graph_pool_bytes: int = 0
    # "measured" (captured before sizing), "reserve" (a fixed guess), "none" (no graphs) or
    # "unbudgeted" (the KV size was fixed by the user; graphs take what they take)
    graph_pool_source: str = "none"
    graph_pool_all_bytes: int | None = None  # what capturing every candidate bucket would take
    other_bytes: int = 0  # resident besides the weights: CUDA context, workspaces
    total_bytes: int = 0
    utilization: float = 0.0
    budget_bytes: int = 0  # total x utilization
    block_size: int = 0
    kv_tokens: int = 0
    kv_tokens_gained: int | None = None  # versus holding back graph_pool_all_bytes
    # what sized the KV pool: "utilization", "kv_cache_memory", "num_gpu_blocks_override" or
    # "cpu_default"
    kv_source: str = ""
    # A draft model (speculative_config "draft_model"): its weights (in weights_bytes too) and
    # its share of block_bytes (a block id holds the target's KV and the draft's).
    draft_weights_bytes: int = 0
    draft_block_bytes: int = 0

    def as_dict(self) -> dict[str, int | float | str | None]:
        return asdict(self)

    def summary_line(self) -> str:
        gib = 2**30
        kv = (
            f"KV cache {self.kv_bytes / gib:.2f} GiB = {self.kv_tokens:,} tokens "
            f"({self.num_blocks:,} blocks of {self.block_size})"
        )
        if self.draft_block_bytes:
            kv += (
                f", the draft model's KV {self.draft_block_bytes / self.block_bytes:.0%} of it "
                f"(draft weights {self.draft_weights_bytes / gib:.2f} GiB)"
            )
        if self.kv_source != "utilization":
            return (
                f"Memory: weights {self.weights_bytes / gib:.2f} GiB; {kv}, set by {self.kv_source}"
            )
        line = (
            f"Memory: {self.total_bytes / gib:.2f} GiB x {self.utilization:.2f} = "
            f"{self.budget_bytes / gib:.2f} GiB: weights {self.weights_bytes / gib:.2f} GiB, "
            f"other {self.other_bytes / gib:.2f} GiB, activation peak "
            f"{self.activation_peak_bytes / gib:.2f} GiB, CUDA graphs "
            f"{self.graph_pool_bytes / gib:.2f} GiB ({self.graph_pool_source}), {kv}"
        )
        if self.kv_tokens_gained:
            line += (
                f"; +{self.kv_tokens_gained:,} tokens versus capturing every bucket "
                f"({(self.graph_pool_all_bytes or 0) / gib:.2f} GiB)"
            )
        return line


def kv_budget_bytes(
    total_bytes: int,
    utilization: float,
    used_bytes: int,
    activation_peak_bytes: int,
    graph_pool_bytes: int,
) -> int:
    """Bytes left for the KV pool: total x utilization minus what is resident (weights, context),
    the activation peak and the graph pool; never negative."""
    budget = int(total_bytes * utilization)
    return max(0, budget - used_bytes - activation_peak_bytes - graph_pool_bytes)


def kv_tokens_gained(
    kv_budget: int,
    graph_pool_bytes: int,
    graph_pool_all_bytes: int,
    block_bytes: int,
    block_size: int,
) -> int:
    """KV tokens held because only `graph_pool_bytes` was held back for graphs, not the
    `graph_pool_all_bytes` that capturing every bucket takes (whole blocks on both sides)."""
    kv_all = max(0, kv_budget + graph_pool_bytes - graph_pool_all_bytes)
    return (kv_budget // block_bytes - kv_all // block_bytes) * block_size


def profile_peak_activation(runner: ModelRunner, num_tokens: int, max_seq_len: int) -> int:
    """Run a worst-case prefill step (num_tokens new tokens, in sequences of at most
    max_seq_len: positions past the model's range would read outside its RoPE table) and
    measure the peak allocation."""
    bs = runner.block_size
    lengths = [max_seq_len] * (num_tokens // max_seq_len)
    if num_tokens % max_seq_len:
        lengths.append(num_tokens % max_seq_len)
    blocks = [-(-n // bs) for n in lengths]
    runner.allocate_kv_cache(sum(blocks))
    step = SchedulerOutput()
    first = 0
    # With the most prompt logprobs a request may ask for: their logits slices count too.
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=runner.config.max_logprobs)
    for i, (n, b) in enumerate(zip(lengths, blocks, strict=True)):
        rid = f"profile-{i}"
        step.new_requests.append(NewRequest(rid, params, prompt_token_ids=(0,) * n))
        step.rows.append(
            ScheduledRow(
                rid, 0, n, [0] * n, new_block_ids=list(range(first, first + b)), sample=True
            )
        )
        first += b
    torch.cuda.synchronize(runner.device)
    torch.cuda.reset_peak_memory_stats(runner.device)
    base = torch.cuda.memory_allocated(runner.device)
    runner.execute_model(step).result()
    torch.cuda.synchronize(runner.device)
    peak = torch.cuda.max_memory_allocated(runner.device) - base
    runner.forget_requests([r.request_id for r in step.rows])
    runner.release_kv_cache()
    torch.cuda.empty_cache()
    return peak


def plan_kv_blocks(
    runner: ModelRunner, limits: RunnerLimits, graphs: GraphPlan | None = None
) -> MemoryPlan:
    """Size this rank's KV pool. `graphs` is its CUDA-graph plan (the auto decision, or the
    measured pool of capturing everything); without one, graphs get a fixed reserve."""
    cfg = runner.config
    # Per device: under tensor/pipeline parallelism a rank holds only its KV heads and layers.
    # A draft model's KV is part of every block (runner/draft_model.py): kv_bytes_per_token
    # counts both, and its weights count with the target's.
    per_token = runner.kv_bytes_per_token()
    block_bytes = per_token * cfg.block_size
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    drafter = runner.drafter
    draft_weights = drafter.weights_bytes if drafter is not None else 0
    plan = MemoryPlan(
        num_blocks=0,
        block_bytes=block_bytes,
        kv_bytes=0,
        weights_bytes=weights + draft_weights,
        block_size=cfg.block_size,
        draft_weights_bytes=draft_weights,
        draft_block_bytes=drafter.kv_bytes_per_token() * cfg.block_size if drafter else 0,
    )
    cuda = runner.device.type == "cuda"
    if cfg.num_gpu_blocks_override is not None:
        plan.num_blocks = cfg.num_gpu_blocks_override
        plan.kv_source = "num_gpu_blocks_override"
    elif cfg.kv_cache_memory is not None:
        plan.num_blocks = cfg.kv_cache_memory // block_bytes
        plan.kv_source = "kv_cache_memory"
    elif not cuda:
        # CPU: enough for every sequence at full length, capped, but never below one full-length
        # sequence (plus a block of slack).
        want = cfg.max_num_seqs * limits.max_model_len * per_token
        floor = (limits.max_model_len + cfg.block_size) * per_token
        plan.num_blocks = max(min(want, CPU_DEFAULT_KV_BYTES), floor) // block_bytes
        plan.kv_source = "cpu_default"
    else:
        plan.kv_source = "utilization"
        plan.utilization = cfg.gpu_memory_utilization
        if graphs is not None and graphs.pool_bytes is not None:
            plan.graph_pool_bytes = graphs.pool_bytes
            plan.graph_pool_source = "measured"
            plan.graph_pool_all_bytes = graphs.pool_all_bytes
        elif graphs is not None and not graphs.kept:
            plan.graph_pool_source = "none"
        elif runner.graphs_possible:
            plan.graph_pool_bytes = GRAPH_RESERVE_BYTES
            plan.graph_pool_source = "reserve"
        plan.activation_peak_bytes = profile_peak_activation(
            runner, limits.max_num_batched_tokens, limits.max_model_len - 1
        )
        free, total = torch.cuda.mem_get_info(runner.device)
        used = total - free  # weights + CUDA context + anything else on the card
        plan.total_bytes = total
        plan.budget_bytes = int(total * cfg.gpu_memory_utilization)
        plan.other_bytes = max(0, used - plan.weights_bytes)
        budget = kv_budget_bytes(
            total,
            cfg.gpu_memory_utilization,
            used,
            plan.activation_peak_bytes,
            plan.graph_pool_bytes,
        )
        plan.num_blocks = budget // block_bytes
        if plan.graph_pool_all_bytes is not None:
            plan.kv_tokens_gained = kv_tokens_gained(
                budget,
                plan.graph_pool_bytes,
                plan.graph_pool_all_bytes,
                block_bytes,
                cfg.block_size,
            )
    if plan.kv_source != "utilization" and cuda:
        plan.graph_pool_source = "unbudgeted" if runner.graphs_possible else "none"
    plan.kv_bytes = plan.num_blocks * block_bytes
    plan.kv_tokens = plan.num_blocks * cfg.block_size
    if plan.num_blocks < 1:
        raise ValueError(
            "no memory is left for the KV cache: raise gpu_memory_utilization or kv_cache_memory"
        )
    return plan
