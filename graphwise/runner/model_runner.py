"""ModelRunner: one rank's model, KV cache and CUDA graphs; steps in, sampled tokens out.

It owns its start-up and answers with numbers (nano-vllm's order: warm up, size, allocate,
capture): `plan_graphs` (the measured CUDA-graph decision), `profile_memory` (how many KV
blocks fit here), `allocate_kv_cache(n)`, `capture_graphs`. Then `execute_model` turns a
`SchedulerOutput` into tensors, runs the model (eagerly, as a graph replay, or as one stage of
a pipeline) and samples; its handle's `result()` is the step's `ModelRunnerOutput`.

Under tensor/pipeline parallelism every rank runs one of these on its shard, fed the same
`SchedulerOutput`s; rank 0 (the driver) samples and broadcasts the tokens device to device, so
every rank has them for the next step's pending inputs (async scheduling). With pipeline
micro-batches a step is launched (`execute_model`: every stage computes its layers and passes
them on) and finished later (`finish_step`: stage 0 receives the rows and samples), after the
next micro-batch was launched; no token is broadcast (no micro-batch takes a pending token).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from graphwise.config import EngineConfig, RunnerLimits
from graphwise.core.step import GrammarBitmask, SchedulerOutput
from graphwise.core.tracing import NULL_TRACER, Tracer
from graphwise.distributed import parallel_state
from graphwise.distributed.parallel_state import SINGLE, ParallelContext
from graphwise.layers import ops
from graphwise.layers.attention import AttentionBackend, AttentionMetadata, ForwardContext
from graphwise.layers.attention.kv_cache_dtype import (
    check_kv_cache_device,
    check_kv_cache_scheme,
    kv_cache_torch_dtype,
)
from graphwise.layers.attention.torch_backend import TorchAttentionBackend
from graphwise.layers.sampler import SamplingTensors, sample, verify_drafts
from graphwise.models.model_config import ModelConfig
from graphwise.runner.inputs import (
    RequestStates,
    RunnerRequest,
    StepInputs,
    Uploader,
    build_step_inputs,
    find_bad_rows,
)
from graphwise.runner.logits_processors import (
    TokenHistory,
    apply_grammar_bitmask,
    apply_logits_processors,
)
from graphwise.runner.logprobs import (
    log_softmax_rows,
    plan_prompt_rows,
    plan_verify_rows,
    prompt_logprobs,
    sampled_logprobs,
    verify_logprobs,
)
from graphwise.runner.pipeline import PendingRows, PendingSends, launch_stage
from graphwise.runner.step_handle import PromptParts, SpecLogprobParts, StepHandle, to_pinned

if TYPE_CHECKING:
    from graphwise.runner.draft_model import DraftModel

logger = logging.getLogger(__name__)
# CUDA graphs on pipeline stages (each stage replays its own layers; the sends stay outside):
# opt-in until a multi-GPU run has checked them (docs/parallel.md).
PP_GRAPHS_ENV = "GRAPHWISE_PP_CUDA_GRAPHS"


def pp_graphs_enabled() -> bool:
    return os.environ.get(PP_GRAPHS_ENV, "0") not in ("", "0")


@dataclass
class _StagedBatch:
    """A micro-batch stage 0 launched and has not finished: what sampling it needs."""

    step_id: int
    inputs: StepInputs
    rows: PendingRows | None  # the last stage's sampled rows, on their way (None: none)
    grammar: GrammarBitmask | None
    used_graph: bool  # stage 0 replayed a graph (what the step counts report)


def select_attention_backend(
    cfg: EngineConfig, device: torch.device, scratch_slot: int
) -> AttentionBackend:
    name = cfg.attention_backend
    if name == "auto":
        from graphwise.kernels import triton_available

        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if device.type != "cuda":
            raise ValueError("attention_backend='triton' needs a CUDA device")
        from graphwise.layers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(scratch_slot)
    return TorchAttentionBackend(scratch_slot)


def local_model_config(mc: ModelConfig, ctx: ParallelContext) -> ModelConfig:
    """The attention shapes one rank sees: its query heads and KV heads (layer indices stay
    global, so a pipeline stage's caches are indexed like the full model's)."""
    kv_count = parallel_state.kv_head_part(mc.num_key_value_heads, ctx.tp_rank, ctx.tp_size)[1]
    return dataclasses.replace(
        mc,
        num_attention_heads=mc.num_attention_heads // ctx.tp_size,
        num_key_value_heads=mc.num_key_value_heads // kv_count,
    )


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model: nn.Module,
        model_config: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        parallel: ParallelContext = SINGLE,
        vocab_limit: int | None = None,
        drafter: DraftModel | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.full_model_config = model_config
        self.model_config = local_model_config(model_config, parallel)
        self.device = device
        self.dtype = dtype
        # The KV cache's element type: the model's, or e4m3 with per-layer scales (the
        # attention layers hold them; the backends quantize and dequantize).
        self.kv_cache_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, dtype)
        check_kv_cache_device(self.kv_cache_dtype, device)
        if config.kv_cache_dtype != "auto":
            check_kv_cache_scheme(model_config.raw.get("quantization_config"))
        self.parallel = parallel
        self.is_driver = parallel.rank == 0
        self.layer_range = parallel_state.stage_layers(
            model_config.num_hidden_layers, parallel.pp_rank, parallel.pp_size
        )
        self.block_size = config.block_size
        self.vocab_limit = vocab_limit  # the tokenizer knows fewer ids than the model
        # speculative_config method "draft_model" (runner/draft_model.py): its KV cache is
        # addressed by the same block ids as the target's.
        self.drafter = drafter
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.backend: AttentionBackend = TorchAttentionBackend(scratch_slot=0)
        self.use_triton_ops = False
        # Penalties and logprobs' rank/top-k through kernels/sampling.py (with the Triton
        # backend: one pass each over the [N, vocab] logits instead of torch's many).
        self.triton_sampling = False
        self.graph_runner = None  # a CudaGraphRunner once graphs are captured
        self.graphs_enabled = True  # benchmarks compare eager and graph in one engine
        self.graph_plan = None  # this rank's GraphPlan, once planned
        self.default_generator = torch.Generator(device=device).manual_seed(config.seed)
        self.requests = RequestStates()
        self.history = TokenHistory(device)  # tokens so far of requests with penalties
        self.upload = Uploader(device)
        self.tracer: Tracer = NULL_TRACER  # spans around the step's phases (explain --nvtx)
        # The last launched step's sampled tokens, on the device: the next step's inputs for
        # requests whose newest token the host does not know yet (async scheduling).
        self._last_tokens: torch.Tensor | None = None
        # A launched step whose sampling waits for its grammar mask (logits, inputs, ...).
        self._deferred: tuple | None = None
        # Pipeline micro-batches (1: one batch in flight, the synchronous pipeline).
        self.num_micro_batches = config.num_pipeline_batches if parallel.pp_size > 1 else 1
        self._staged: deque[_StagedBatch] = deque()  # stage 0: launched, not finished
        self._sends = PendingSends()  # this stage's hidden states (or rows) on their way

    # ---- start-up -----------------------------------------------------------------------
    @property
    def graphs_possible(self) -> bool:
        """CUDA graphs can run here: CUDA, not turned off, and no pipeline unless its stage
        graphs were asked for (GRAPHWISE_PP_CUDA_GRAPHS=1; pipeline stages run eagerly by
        default)."""
        return (
            self.device.type == "cuda"
            and self.config.use_cuda_graph != "off"
            and (self.parallel.pp_size == 1 or pp_graphs_enabled())
        )

    def kv_bytes_per_token(self) -> int:
        """KV bytes one token takes on this rank: its KV heads, its stage's layers (and the
        draft model's layers: one block id holds both)."""
        mc = self.model_config
        start, end = self.layer_range
        elem = torch.empty(0, dtype=self.kv_cache_dtype).element_size()  # fp8: 1 byte
        draft = self.drafter.kv_bytes_per_token() if self.drafter is not None else 0
        return 2 * (end - start) * mc.num_key_value_heads * mc.head_dim * elem + draft

    def plan_graphs(self, limits: RunnerLimits):  # -> GraphPlan | None
        """The measured decision of which batch sizes replay a graph (runner/graph_policy.py);
        kept for `profile_memory` and `capture_graphs`."""
        from graphwise.runner.graph_policy import plan_cuda_graphs

        self.graph_plan = plan_cuda_graphs(self, limits)
        return self.graph_plan

    def profile_memory(self, limits: RunnerLimits):  # -> MemoryPlan
        """How many KV blocks this rank can hold (runner/memory.py)."""
        from graphwise.runner.memory import plan_kv_blocks

        return plan_kv_blocks(self, limits, self.graph_plan)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One (k, v) pair per layer of this stage, plus one scratch block that padding lanes
        write into."""
        self.release_kv_cache()  # drop a previous (profiling) cache before allocating
        mc = self.model_config
        shape = (num_blocks + 1, self.block_size, mc.num_key_value_heads, mc.head_dim)
        start, end = self.layer_range
        kv_dtype = self.kv_cache_dtype
        none = torch.empty(0, dtype=kv_dtype, device=self.device)

        def pair() -> tuple[torch.Tensor, torch.Tensor]:
            return (
                torch.zeros(shape, dtype=kv_dtype, device=self.device),
                torch.zeros(shape, dtype=kv_dtype, device=self.device),
            )

        self.kv_caches = [
            pair() if start <= i < end else (none, none) for i in range(mc.num_hidden_layers)
        ]
        self.num_blocks = num_blocks
        self.backend = select_attention_backend(
            self.config, self.device, scratch_slot=num_blocks * self.block_size
        )
        self.use_triton_ops = self.backend.name == "triton"
        self.triton_sampling = self.use_triton_ops
        if self.drafter is not None:
            backend = select_attention_backend(
                self.config, self.device, scratch_slot=num_blocks * self.block_size
            )
            self.drafter.allocate_kv_cache(num_blocks, backend, self.use_triton_ops)

    def release_kv_cache(self) -> None:
        self.kv_caches = []
        self.num_blocks = 0
        self.backend = TorchAttentionBackend(scratch_slot=0)  # drops graph buffers, workspace
        if self.drafter is not None:
            self.drafter.release_kv_cache()

    def capture_graphs(self, limits: RunnerLimits):  # -> CaptureStats | None
        """Capture the planned buckets on the real KV cache; what the capture took (None when
        no graph runs here)."""
        self.history.set_max_len(limits.max_model_len)  # the last start-up call
        plan = self.graph_plan
        mode = self.config.use_cuda_graph
        if self.device.type != "cuda":
            if mode == "on":
                raise ValueError("cuda_graph='on' needs a CUDA device; use 'off' or 'auto'")
            return None
        if not self.graphs_possible or (plan is not None and not plan.kept):
            return None
        from graphwise.runner.cuda_graph import CudaGraphRunner

        graphs = CudaGraphRunner(
            self,
            self.config,
            limits.max_model_len,
            buckets=plan.kept if plan is not None else None,
            eager_buckets=plan.eager_buckets if plan is not None else None,
        )
        stats = graphs.capture_all()  # the ranks agree bucket by bucket (try_capture)
        self.graph_runner = graphs if graphs.graphs else None
        return stats

    def release_graphs(self) -> None:
        """Drop captured graphs (they hold NCCL work: before a process group goes)."""
        if self.graph_runner is not None:
            self.graph_runner.release(set())
            self.graph_runner = None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    def graph_buckets(self) -> list[int]:
        """The batch sizes this rank replays as graphs (empty: it decodes eagerly)."""
        return [] if self.graph_runner is None else list(self.graph_runner.buckets)

    def set_graphs_enabled(self, enabled: bool) -> None:
        self.graphs_enabled = enabled

    def use_graph_runner(self, graphs: Any) -> Any:
        """Replay `graphs` (a CudaGraphRunner, or None for eager) from now on; returns the one
        it replaces. `graphwise explain` times its own captures through the engine this way."""
        previous, self.graph_runner = self.graph_runner, graphs
        return previous

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy KV blocks (src, dst) in every layer this rank holds: the copy-on-write of
        blocks that forked samples share (n > 1). Queued before the step's forward, on the
        same stream, so the copy reads what earlier steps wrote and precedes this step's
        writes. Every rank makes it on its own shard (the SchedulerOutput carries it). The
        blocks are copied as raw bytes, whatever the cache's dtype (index_copy_ has no fp8
        kernel on the CPU; an fp8 block's scales are per layer, so its bytes are all of it)."""
        src, dst = self.upload(torch.int64, [s for s, _ in copies], [d for _, d in copies])
        draft = self.drafter.kv_caches if self.drafter is not None else []
        for k, v in [*self.kv_caches, *draft]:
            if k.numel():  # a pipeline stage holds only its own layers
                for cache in (k.view(torch.uint8), v.view(torch.uint8)):
                    cache.index_copy_(0, dst, cache.index_select(0, src))

    def forget_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.requests.pop(rid, None)

    # ---- one step -----------------------------------------------------------------------
    def run_model(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):  # -> torch.Tensor, or (hidden, residual) on a pipeline stage that is not the last
        """The model's forward on this runner's KV cache and backend (every eager forward, and
        every graph capture, goes through here)."""
        ctx = ForwardContext(meta, self.backend, self.kv_caches)
        with ops.triton_ops(self.use_triton_ops):
            if intermediate is None:
                return self.model(input_ids, positions, ctx)
            return self.model(input_ids, positions, ctx, intermediate=intermediate)

    def forward(self, inputs: StepInputs) -> tuple[torch.Tensor, bool]:
        """Hidden states [T, H] for the step's tokens, and whether a graph replayed them."""
        if self.parallel.pp_size > 1:
            from graphwise.runner.pipeline import pipeline_forward

            return pipeline_forward(self, inputs)
        return self.stage_forward(inputs)

    def stage_forward(
        self, inputs: StepInputs, intermediate: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[Any, bool]:
        """This rank's layers on the step (a graph replay where one fits, else eagerly), and
        whether a graph ran: hidden states, or (hidden, residual) on a pipeline stage before
        the last; `intermediate` is the previous stage's on a stage after the first."""
        graphs = self.graph_runner
        if graphs is not None and self.graphs_enabled and graphs.can_replay(inputs):
            return graphs.replay(inputs, intermediate), True
        return self.run_model(inputs.input_ids, inputs.positions, inputs.meta, intermediate), False

    @torch.inference_mode()
    def execute_model(self, step: SchedulerOutput) -> StepHandle:
        """Enqueue one step (inputs, forward, sampling) without waiting for the device."""
        self.tracer.push("launch")
        try:
            return self._execute(step)
        finally:
            self.tracer.pop()

    def _execute(self, step: SchedulerOutput) -> StepHandle:
        trace = self.tracer
        trace.push("prepare")
        try:
            self.requests.update(step)
            for rid in step.finished_request_ids:
                self.history.forget(rid)
            if step.block_copies:
                self.copy_blocks(step.block_copies)
            inputs = build_step_inputs(
                step,
                self.requests,
                self.upload,
                self.block_size,
                self._last_tokens,
                # verify steps that fit a decode graph attend as decode rows (a larger one
                # keeps the extend path, which reads each row's KV once)
                max_decode_rows=self.config.cuda_graph_max_rows,
            )
            if self.is_driver and self.requests.num_special:  # only rank 0 samples
                self.history.record(step.rows, inputs.input_ids, self.requests, self.upload)
        finally:
            trace.pop()
        if self.num_micro_batches > 1:
            return self._launch_micro_batch(step, inputs)
        if self.drafter is not None:
            trace.push("draft")
            try:
                self._propose(step, inputs)
            finally:
                trace.pop()
        trace.push("forward")
        try:
            hidden, used_graph = self.forward(inputs)
        finally:
            trace.pop()
        prompt = None
        if self.requests.num_prompt_pending and self.parallel.is_first_stage:
            prompt = self._prompt_logprobs(step, hidden)
        req_ids = [r.request_id for r in inputs.sampled]
        if not req_ids:
            return self._handle([], None, used_graph, None, prompt)
        logits = None
        if self.parallel.is_first_stage:  # with TP every rank of stage 0 joins the gather
            trace.push("logits")
            try:
                logits = self.model.compute_logits(hidden[inputs.logits_indices])  # type: ignore[operator]
                if inputs.spec is not None:  # the positions that verify drafts
                    inputs.spec.logits = self.model.compute_logits(  # type: ignore[operator]
                        hidden[inputs.spec.logits_indices]
                    )
            finally:
                trace.pop()
        if step.grammar is not None and step.grammar.bitmask is None:
            # The grammar mask waits for the previous step's token: sample when it comes.
            self._deferred = (logits, inputs, req_ids, used_graph, prompt)
            return StepHandle([], None, used_graph)
        trace.push("sample")  # everything after the logits
        try:
            return self._sample_and_share(logits, inputs, req_ids, used_graph, prompt, step.grammar)
        finally:
            trace.pop()

    def _launch_micro_batch(self, step: SchedulerOutput, inputs: StepInputs) -> StepHandle:
        """This stage's share of a micro-batch, passed on without waiting (runner/pipeline.py);
        stage 0 keeps what `finish_step` needs to sample it."""
        if step.grammar is not None and step.grammar.bitmask is None:
            raise RuntimeError("a micro-batch's grammar mask is filled when it is scheduled")
        self.tracer.push("forward")
        try:
            rows, used_graph = launch_stage(self, inputs, self._sends)
        finally:
            self.tracer.pop()
        if self.parallel.is_first_stage:
            staged = _StagedBatch(step.step_id, inputs, rows, step.grammar, used_graph)
            self._staged.append(staged)
        return StepHandle([], None, used_graph)

    @torch.inference_mode()
    def finish_step(self, step_id: int) -> StepHandle:
        """Sample the oldest launched micro-batch: stage 0 waits for its rows from the last
        stage, computes the logits (every TP rank of stage 0: the vocabulary gather) and rank 0
        samples. Other stages have nothing to do."""
        if not self.parallel.is_first_stage:
            return StepHandle([], None, False)
        if not self._staged or self._staged[0].step_id != step_id:
            launched = [b.step_id for b in self._staged]
            raise RuntimeError(
                f"finish_step({step_id}): the micro-batches in flight are {launched}"
            )
        staged = self._staged.popleft()
        inputs = staged.inputs
        req_ids = [r.request_id for r in inputs.sampled]
        if staged.rows is None:
            return self._handle([], None, staged.used_graph, None, None)
        self.tracer.push("finish")
        try:
            self.tracer.push("logits")
            try:
                logits = self.model.compute_logits(staged.rows.wait())  # type: ignore[operator]
            finally:
                self.tracer.pop()
            self.tracer.push("sample")
            try:
                return self._sample_and_share(
                    logits, inputs, req_ids, staged.used_graph, None, staged.grammar
                )
            finally:
                self.tracer.pop()
        finally:
            self.tracer.pop()

    def _propose(self, step: SchedulerOutput, inputs: StepInputs) -> None:
        """The draft model's part of the step (runner/draft_model.py): it computes the rows the
        target computes and drafts the tokens of the rows that verify drafts, into `inputs`."""
        assert self.drafter is not None
        spec = inputs.spec
        params = None
        if spec is not None:
            params = self._sampling_tensors(
                [self.requests[inputs.sampled[i].request_id] for i in spec.rows]
            )
        self.drafter.propose(
            step,
            inputs,
            self.requests,
            self.upload,
            self._last_tokens,
            params,
            self.default_generator,
            self.vocab_limit,
        )

    def _prompt_logprobs(self, step: SchedulerOutput, hidden: torch.Tensor) -> PromptParts | None:
        """The prompt logprobs this step's rows ask for (runner/logprobs.py), on the driver."""
        plan = plan_prompt_rows(step.rows, self.requests, self.upload)
        if plan is None:
            return None
        self.tracer.push("prompt_logprobs")
        try:
            out = prompt_logprobs(
                hidden,
                plan,
                self.model.compute_logits,  # type: ignore[arg-type]
                self.full_model_config.vocab_size,
                keep=self.is_driver,
            )
        finally:
            self.tracer.pop()
        return None if out is None else (plan.rows, *out)

    @torch.inference_mode()
    def sample_deferred(self, grammar: GrammarBitmask) -> StepHandle:
        """Sample the step launched last, whose sampling waited for its grammar mask."""
        if self._deferred is None:
            raise RuntimeError("sample_deferred without a step waiting for its grammar mask")
        logits, inputs, req_ids, used_graph, prompt = self._deferred
        self._deferred = None
        self.tracer.push("sample")
        try:
            return self._sample_and_share(logits, inputs, req_ids, used_graph, prompt, grammar)
        finally:
            self.tracer.pop()

    def _sample_and_share(
        self,
        logits: torch.Tensor | None,
        inputs: StepInputs,
        req_ids: list[str],
        used_graph: bool,
        prompt: PromptParts | None = None,
        grammar: GrammarBitmask | None = None,
    ) -> StepHandle:
        logprobs = None
        spec = None
        spec_logprobs = None
        if self.is_driver:
            assert logits is not None
            wanted = (
                [
                    (i, k)
                    for i, row in enumerate(inputs.sampled)
                    if (k := self.requests[row.request_id].params.logprobs) is not None
                ]
                if self.requests.num_special
                else []
            )
            # Of the raw logits, before any masking (vLLM's default "raw_logprobs").
            raw = log_softmax_rows(logits, wanted, self.upload)
            verify_rows = None
            if raw is not None and inputs.spec is not None:
                # Verify rows' draft positions too (before _verify masks their logits).
                assert inputs.spec.logits is not None
                drafts = inputs.spec
                verify_rows = plan_verify_rows(
                    drafts.logits, drafts.rows, drafts.num_drafts, wanted, self.upload
                )
            if grammar is not None:
                apply_grammar_bitmask(logits, grammar.rows, grammar.bitmask, self.upload)
            tokens = self._sample(logits, inputs)
            if raw is not None:
                logprobs = sampled_logprobs(
                    raw, tokens, wanted, self.upload, use_triton=self.triton_sampling
                )
            if inputs.spec is not None:
                spec = self._verify(inputs, tokens)
                tokens = spec[2]
                if verify_rows is not None:
                    assert raw is not None
                    spec_logprobs = verify_logprobs(verify_rows, raw, spec[1], self.upload)
        else:
            tokens = torch.empty(len(req_ids), dtype=torch.int64, device=self.device)
        if self.parallel.world_size > 1 and self.num_micro_batches == 1:
            # Every rank needs the tokens for the next step's pending inputs: rank 0 sends them
            # device to device (one small collective, no host sync). A micro-batch never takes
            # a pending token (its sequences wait for their batch to resolve).
            dist.broadcast(tokens, src=0)
        self._last_tokens = tokens
        if not self.is_driver:
            return StepHandle([], None, used_graph)
        return self._handle(req_ids, tokens, used_graph, logprobs, prompt, spec, spec_logprobs)

    def _verify(
        self, inputs: StepInputs, tokens: torch.Tensor
    ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Accept or reject the drafts of the step's verify rows (layers/sampler.py
        verify_drafts). `tokens` are every sampled row's token at its last position (for a
        verify row: the bonus after all its drafts). Returns the verify rows, their [S, K + 1]
        emitted tokens (-1 padded) and the step's last token per sampled row."""
        spec = inputs.spec
        assert spec is not None and spec.logits is not None
        draft_logits, draft_probs = spec.logits, spec.draft_probs
        spec.logits = spec.draft_probs = None
        if self.vocab_limit is not None:
            draft_logits[:, self.vocab_limit :] = float("-inf")
        rows_t = self.upload(torch.int64, spec.rows)[0]
        states = [self.requests[inputs.sampled[i].request_id] for i in spec.rows]
        params = self._sampling_tensors(states)
        emitted, last = verify_drafts(
            draft_logits,
            spec.draft_ids,
            spec.slots,
            spec.num_drafts,
            spec.num_drafts_t,
            tokens.index_select(0, rows_t),
            params,
            self.default_generator,
            draft_probs,
        )
        tokens = tokens.index_copy(0, rows_t, last)
        return spec.rows, emitted, tokens

    def _handle(
        self,
        req_ids: list[str],
        tokens: torch.Tensor | None,
        used_graph: bool,
        logprobs: tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor] | None,
        prompt: PromptParts | None,
        spec: tuple[list[int], torch.Tensor, torch.Tensor] | None = None,
        spec_logprobs: SpecLogprobParts | None = None,
    ) -> StepHandle:
        emitted = None if spec is None else (spec[0], spec[1])
        if self.device.type != "cuda" or (tokens is None and prompt is None):
            return StepHandle(
                req_ids,
                tokens,
                used_graph,
                logprobs=logprobs,
                prompt=prompt,
                spec=emitted,
                spec_logprobs=spec_logprobs,
            )
        # Copy to pinned memory behind the step and mark it: result() waits for this step only.
        # The caching host allocator does not hand the buffers out again before the copies ran.
        host = None if tokens is None else to_pinned(tokens)
        if logprobs is not None:
            logprobs = (logprobs[0], to_pinned(logprobs[1]), to_pinned(logprobs[2]))
        if prompt is not None:
            prompt = (prompt[0], to_pinned(prompt[1]), to_pinned(prompt[2]))
        if emitted is not None:
            emitted = (emitted[0], to_pinned(emitted[1]))
        if spec_logprobs is not None:
            spec_logprobs = (
                spec_logprobs[0],
                to_pinned(spec_logprobs[1]),
                to_pinned(spec_logprobs[2]),
            )
        event = torch.cuda.Event()
        event.record()
        return StepHandle(
            req_ids, host, used_graph, event, logprobs, prompt, emitted, spec_logprobs
        )

    def _sample(self, logits: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        apply_logits_processors(
            logits,
            inputs,
            self.requests,
            self.history,
            self.upload,
            self.vocab_limit,
            use_triton=self.triton_sampling,
        )
        params = self.sampling_tensors(inputs)
        if params is None:
            return logits.argmax(dim=-1)
        return sample(logits, params, self.default_generator)

    def sampling_tensors(self, inputs: StepInputs) -> SamplingTensors | None:
        """Per-row sampling parameters on the device; None when every row is greedy."""
        return self._sampling_tensors([self.requests[r.request_id] for r in inputs.sampled])

    def _sampling_tensors(self, states: list[RunnerRequest]) -> SamplingTensors | None:
        if all(s.params.greedy for s in states):  # below 1e-5: greedy (sampler.py)
            return None
        vocab = self.model_config.vocab_size
        temps: list[float] = []
        top_ks: list[int] = []
        top_ps: list[float] = []
        gens: list[torch.Generator | None] = []
        for state in states:
            p = state.params
            temps.append(float(p.temperature))
            top_ks.append(vocab if p.top_k < 0 else min(p.top_k, vocab))
            top_ps.append(float(p.top_p))
            if p.seed is not None and p.temperature > 0 and state.generator is None:
                state.generator = torch.Generator(device=self.device).manual_seed(p.seed)
            gens.append(state.generator)
        (top_k,) = self.upload(torch.int64, top_ks)
        temperature, top_p = self.upload(torch.float32, temps, top_ps)
        min_ps = [float(s.params.min_p) for s in states]
        return SamplingTensors(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            all_greedy=False,
            any_top_k_top_p=any(k < vocab for k in top_ks) or any(p < 1.0 for p in top_ps),
            generators=gens,
            min_p=self.upload(torch.float32, min_ps)[0] if any(min_ps) else None,
        )

    def find_bad_rows(self, step: SchedulerOutput) -> dict[str, str]:
        """The rows of a failed step this runner cannot run, with why (see runner/inputs.py)."""
        return find_bad_rows(
            step,
            self.requests,
            self.full_model_config.vocab_size,
            self.num_blocks,
            self.model_config.max_position_embeddings,
        )

    @torch.inference_mode()
    def prompt_logits(self, step: SchedulerOutput) -> torch.Tensor | None:
        """Logits at every new position of a step (tests compare them with HF); the driver's
        are the whole vocabulary, other ranks return None."""
        self.requests.update(step)
        inputs = build_step_inputs(
            step, self.requests, self.upload, self.block_size, self._last_tokens
        )
        inputs.logits_indices = torch.arange(
            inputs.input_ids.shape[0], dtype=torch.int64, device=self.device
        )
        hidden, _ = self.forward(inputs)
        if not self.parallel.is_first_stage:
            return None
        return self.model.compute_logits(hidden[inputs.logits_indices])  # type: ignore[operator]
