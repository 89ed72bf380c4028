"""LLMEngine: requests in, one scheduling + model step at a time, outputs out.

Used directly by the offline API (`LLM`) and, behind a thread, by the server. Its parts talk
through data: the scheduler describes a step (`SchedulerOutput`), the executor runs it on the
model runner(s) and answers with numbers (`ModelRunnerOutput`), the scheduler takes those back
(`update_from_output`) and the output processor turns the updates into text and outputs.

Start-up asks the runner(s) for numbers and hands them limits, in order: the CUDA-graph plan
(measured), how many KV blocks fit (profiled; the smallest over the ranks), the allocation, the
capture. Nothing below the engine is handed the engine.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import deque
from concurrent import futures
from dataclasses import dataclass
from typing import Any

from graphwise.config import EngineConfig, RunnerLimits
from graphwise.core.device import resolve_device, resolve_dtype, resolve_kv_cache_dtype
from graphwise.core.step import SchedulerOutput
from graphwise.core.tracing import NULL_TRACER, StepRecord, StepSink, Tracer
from graphwise.engine.block_manager import BlockManager
from graphwise.engine.client import EngineStats
from graphwise.engine.output_processor import OutputProcessor
from graphwise.engine.reasoning import ReasoningPhase
from graphwise.engine.scheduler import RequestUpdate, Scheduler
from graphwise.engine.sequence import Sequence
from graphwise.engine.structured import RequestGrammar, StructuredOutputs
from graphwise.engine.validation import InvalidRequest, RequestLimits, normalize_request
from graphwise.executor import create_executor
from graphwise.models.loader import (
    ModelSource,
    check_draft_model,
    draft_source,
    load_tokenizer,
    model_config_of,
    resolve_source,
)
from graphwise.outputs import RequestOutput
from graphwise.runner.step_handle import StepHandle
from graphwise.sampling_params import SamplingParams
from graphwise.tokenizer import bad_words_token_ids, encode_prompt

logger = logging.getLogger(__name__)


@dataclass(eq=False)  # compared by identity (the in-flight queue's remove)
class _Launched:
    step: SchedulerOutput
    handle: StepHandle
    deferred: bool = False  # sampling waits for the grammar mask (sample_deferred)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        if config.data_parallel_size > 1:
            raise ValueError(
                "data_parallel_size > 1 runs several engines: build it with "
                "graphwise.engine.client.create_engine_client(config) (LLM does)"
            )
        self.config = config
        source = resolve_source(config)
        self.model_name = source.name
        self.model_config = model_config_of(source, config)
        mc = self.model_config
        device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, device, mc.torch_dtype)
        # The KV cache's element type: the model's, or e4m3 (kv_cache_dtype="fp8").
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.tokenizer = load_tokenizer(source, config)
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) exceeds the model's "
                f"max_position_embeddings ({mc.max_position_embeddings})"
            )
        self.eos_token_ids = self._eos_ids(source)
        spec = config.speculative
        if spec is not None and spec.uses_draft_model:
            self._check_draft_model(source)  # before anything is loaded
        budget = config.max_num_batched_tokens or max(2048, config.max_num_seqs)
        if not config.enable_chunked_prefill:
            budget = max(budget, self.max_model_len)
        self.max_num_batched_tokens = budget
        self.request_limits = RequestLimits(
            mc.vocab_size,
            self.max_model_len,
            config.max_logprobs,
            prompt_logprobs=config.pipeline_parallel_size == 1,
        )

        vocab_limit = None
        if self.tokenizer is not None and len(self.tokenizer) < mc.vocab_size:
            # e.g. a preset (dummy weights) served with a small stand-in tokenizer
            vocab_limit = len(self.tokenizer)
            logger.info(
                "tokenizer has %d ids, the model %d: sampling is limited to the tokenizer's",
                vocab_limit,
                mc.vocab_size,
            )
        self.executor = create_executor(config, source, device, self.dtype, vocab_limit)
        try:
            self._start_runners()
        except BaseException:
            self.executor.shutdown()
            raise
        self.block_manager = BlockManager(
            self.memory_plan.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            self.max_num_batched_tokens,
            config.enable_chunked_prefill,
            self.max_model_len,
            config.speculative,
            micro_batches=config.num_pipeline_batches,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        # Structured output (engine/structured.py): made on the first constrained request.
        self._structured: StructuredOutputs | None = None
        self._compiling: list[Sequence] = []  # constrained requests whose grammar is compiling
        self._ids = itertools.count()
        self.async_scheduling = config.async_scheduling
        # Launched steps not resolved yet, oldest first (see _resolve_above).
        self.num_micro_batches = config.num_pipeline_batches
        self._inflight: deque[_Launched] = deque()
        self.step_log: StepSink | None = None  # set to record where each step's time goes
        self.tracer: Tracer = NULL_TRACER
        self._counts = dict.fromkeys(
            ("prompt_tokens", "generation_tokens", "steps", "steps_graph", "steps_eager"), 0
        )

    def _start_runners(self) -> None:
        """Graphs first: the auto policy times them and measures the kept graphs' pool, which
        the memory plan then holds back from the KV pool."""
        limits = RunnerLimits(self.max_model_len, self.max_num_batched_tokens)
        executor = self.executor
        self.graph_plan = executor.collective_rpc("plan_graphs", limits)[0]
        plans = executor.collective_rpc("profile_memory", limits)
        num_blocks = min(p.num_blocks for p in plans)
        self.memory_plan = plans[0]  # rank 0's numbers, with the pool every rank can hold
        if num_blocks != self.memory_plan.num_blocks:
            self.memory_plan.num_blocks = num_blocks
            self.memory_plan.kv_bytes = num_blocks * self.memory_plan.block_bytes
            self.memory_plan.kv_tokens = num_blocks * self.config.block_size
        logger.info(self.memory_plan.summary_line())
        if num_blocks * self.config.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * self.config.block_size} tokens, fewer than "
                f"max_model_len ({self.max_model_len}): raise gpu_memory_utilization / "
                "kv_cache_memory or lower max_model_len"
            )
        executor.collective_rpc("allocate_kv_cache", num_blocks)
        driver = executor.driver
        logger.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB per rank, %s), attention backend: %s",
            num_blocks,
            self.config.block_size,
            num_blocks * driver.kv_bytes_per_token() * self.config.block_size / 2**20,
            str(self.kv_cache_dtype).removeprefix("torch."),
            driver.backend.name,
        )
        self.capture_stats = executor.collective_rpc("capture_graphs", limits)[0]
        if self.capture_stats is not None:
            if self.graph_plan is not None:
                self.graph_plan.record_capture(self.capture_stats)
        elif self.graph_plan is not None and not self.graph_plan.kept:
            logger.info(
                "CUDA graphs: no bucket is %.2fx faster as a graph: decode runs eagerly",
                self.graph_plan.min_speedup,
            )
        elif not driver.graphs_possible:
            logger.info(
                "cuda_graph=%s: %s, decode runs eagerly",
                self.config.use_cuda_graph,
                _why_no_graphs(driver),
            )

    def _check_draft_model(self, source: ModelSource) -> None:
        """The draft model must speak the target's token ids (same vocabulary, and the same
        tokenizer when both have one) and reach every position the engine serves."""
        draft, draft_cfg = draft_source(self.config)
        mc = model_config_of(draft, draft_cfg)
        check_draft_model(mc, self.model_config, draft)
        if mc.max_position_embeddings < self.max_model_len:
            if self.config.max_model_len is not None:
                raise ValueError(
                    f"max_model_len ({self.max_model_len}) exceeds the draft model's "
                    f"max_position_embeddings ({mc.max_position_embeddings})"
                )
            self.max_model_len = mc.max_position_embeddings  # the default: what both reach
            logger.info("max_model_len %d: the draft model's reach", self.max_model_len)
        same_file = (
            draft.path is not None
            and source.path is not None
            and (draft.path.resolve() == source.path.resolve())
        )
        if self.tokenizer is None or same_file:
            return
        tokenizer = load_tokenizer(draft, draft_cfg)
        if tokenizer is not None and tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(
                f"speculative_config.model {draft.name!r} has another tokenizer than the target "
                f"model ({len(tokenizer)} and {len(self.tokenizer)} tokens): a draft model must "
                "share the target's tokenizer"
            )

    def _eos_ids(self, source: ModelSource) -> frozenset[int]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        if source.kind == "hf":
            assert source.path is not None
            gen = source.path / "generation_config.json"
            if gen.is_file():
                eos = json.loads(gen.read_text()).get("eos_token_id")
                if eos is not None:
                    ids.update([eos] if isinstance(eos, int) else eos)
        return frozenset(ids)

    @property
    def device(self) -> Any:
        return self.executor.device

    # ---- requests ---------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.model_name)

    def add_request(
        self,
        prompt: str | None,
        sampling_params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> str:
        params, ids = normalize_request(
            prompt, sampling_params, prompt_token_ids, self.tokenize, self.request_limits
        )
        rid = request_id if request_id is not None else str(next(self._ids))
        op = self.output_processor
        if rid in self.scheduler.requests or rid in op.requests or rid in op.samples:
            raise ValueError(f"request_id {rid!r} is already in use")
        max_total = self.max_model_len
        if params.max_tokens is not None:
            max_total = min(max_total, len(ids) + params.max_tokens)
        bad_words = ()
        if params.bad_words:
            try:
                bad_words = bad_words_token_ids(self.tokenizer, params.bad_words)
            except ValueError as exc:
                raise InvalidRequest(str(exc), "bad_words") from exc
        # n > 1: one sequence per sample, "<i>_<id>" as in vLLM; the scheduler computes the
        # prompt once and forks the others from the first.
        sample_ids = [f"{i}_{rid}" for i in range(params.n)] if params.n > 1 else [rid]
        arrival = time.monotonic()
        seqs = [
            Sequence(
                sid,
                ids,
                params.for_sample(i) if params.n > 1 else params,
                self.eos_token_ids,
                arrival_time=arrival,
                max_total_tokens=max_total,
                bad_words_ids=bad_words,
            )
            for i, sid in enumerate(sample_ids)
        ]
        if params.structured_outputs is not None:
            try:
                grammar = self.structured.request_grammar(params.structured_outputs)
            except ValueError as exc:
                raise InvalidRequest(str(exc), "structured_outputs") from exc
            # Each sample has its own matcher over the one compile (the first waits for it).
            seqs[0].grammar = grammar
            for seq in seqs[1:]:
                seq.grammar = RequestGrammar(grammar.future, grammar.key, grammar.stop_ids)
            if params.reasoning is not None:  # the constraint starts after the reasoning
                for seq in seqs:
                    seq.grammar.reasoning = ReasoningPhase(params.reasoning)
            self._compiling.append(seqs[0])
        self.scheduler.add(seqs[0], forks=seqs[1:])
        self.output_processor.add_request(
            rid,
            prompt,
            seqs[0].prompt_token_ids,
            params,
            arrival,
            sample_ids if params.n > 1 else None,
        )
        return rid

    @property
    def structured(self) -> StructuredOutputs:
        if self._structured is None:
            self._structured = StructuredOutputs(
                self.tokenizer,
                self.model_config.vocab_size,
                self.eos_token_ids,
                fill_threads=self.config.structured_outputs_fill_threads,
                # Masks filled straight into pinned memory: one asynchronous copy to the GPU.
                pin_memory=self.device.type == "cuda",
            )
        return self._structured

    def abort_request(self, request_id: str) -> bool:
        sample_ids = self.output_processor.sample_ids(request_id)
        known = self.output_processor.abort(request_id)
        ended = [self.scheduler.finish_request(sid, "abort") for sid in sample_ids]
        return any(ended) and known

    def drain(self) -> list[RequestOutput]:
        """Resolve the step still in flight when no request is left to schedule (with async
        scheduling the last step() of a batch leaves one, sampled for sequences that then
        finished). Returns its outputs (usually none)."""
        outputs: list[RequestOutput] = []
        while self._inflight and not self.scheduler.has_unfinished():
            outputs.extend(self.step())
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._inflight)

    @property
    def alive(self) -> bool:
        """False once the tensor/pipeline-parallel workers are gone (nothing more can run)."""
        return self.executor.alive

    def unfinished_request_ids(self) -> list[str]:
        """The user's ids (an n > 1 request once, however many samples still run)."""
        op = self.output_processor
        return list(dict.fromkeys(op.request_id_of(sid) for sid in self.scheduler.requests))

    # ---- one step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step; return the outputs of the step that completed.

        With async scheduling the step launched here runs on the GPU while the host resolves
        the previous one (waits for its tokens, detokenizes, checks stops) and, on the next
        call, schedules the one after: the host's per-step work hides behind the GPU's.
        Without it, the step launched here is resolved before returning."""
        self.tracer.push("step")
        try:
            return self._step()
        finally:
            self.tracer.pop()

    def _step(self) -> list[RequestOutput]:
        trace = self.tracer
        t0 = time.perf_counter()
        grammar_failed = self._check_grammars() if self._compiling else []
        trace.push("schedule")
        try:
            step = self.scheduler.schedule()
            deferred = step.grammar is not None and self._fill_grammar(step)
        finally:
            trace.pop()
        t1 = time.perf_counter()
        launched, failed = self._launch(step, deferred) if step.rows else (None, [])
        t2 = time.perf_counter()
        inflight = self._inflight
        if launched is not None:
            inflight.append(launched)
        previous = None
        if inflight and (len(inflight) > self._resolve_above() or launched is None):
            previous = inflight.popleft()
        updates: list[RequestUpdate] = grammar_failed + failed
        wait_s = 0.0
        if previous is not None:
            trace.push("resolve")
            try:
                resolved, wait_s = self._resolve(previous)
            finally:
                trace.pop()
            updates = resolved + updates
        elif launched is None and not failed and self.scheduler.waiting:
            if self._compiling:  # nothing to run until a grammar is compiled: wait for one
                futures.wait([s.grammar.future for s in self._compiling], 0.1, "FIRST_COMPLETED")
            elif not self.scheduler.running:
                raise RuntimeError("scheduler cannot admit any waiting request (KV pool too small)")
        outputs = self._process(updates)
        if launched is not None and launched.deferred:
            # The previous step's tokens are in the matchers now (and its outputs processed,
            # stop strings applied): fill the mask and sample, while the GPU still runs this
            # step's forward. Processing first keeps that host work inside the same window.
            outputs += self._process(self._sample_deferred(launched))
        if self.step_log is not None:
            t3 = time.perf_counter()
            self.step_log.add(
                StepRecord(
                    seqs=len(step.rows) if launched else 0,
                    tokens=step.num_tokens if launched else 0,
                    prefill_tokens=step.num_prefill_tokens if launched else 0,
                    context_tokens=step.num_context_tokens if launched else 0,
                    schedule_s=t1 - t0,
                    launch_s=t2 - t1,
                    wait_s=wait_s,
                    process_s=t3 - t2 - wait_s,
                    total_s=t3 - t0,
                )
            )
        return outputs

    def _resolve_above(self) -> int:
        """A step resolves the oldest step in flight once more than this many are (or when it
        launched nothing): 0 runs one step at a time; 1 is async scheduling (step N+1 launched
        before step N resolves); m - 1 with m pipeline micro-batches (engine/microbatch.py),
        each its own sequences. Read each step: benchmarks switch async scheduling."""
        if not self.async_scheduling:
            return 0
        return max(1, self.num_micro_batches - 1)

    def _launch(
        self, step: SchedulerOutput, deferred: bool = False
    ) -> tuple[_Launched | None, list[RequestUpdate]]:
        try:
            handle = self.executor.execute_model(step)
        except Exception as exc:
            return None, self._isolate_failure(step, exc)
        self._counts["prompt_tokens"] += step.num_prefill_tokens
        self._counts["steps"] += 1
        return _Launched(step, handle, deferred), []

    # ---- structured output ------------------------------------------------------------
    def _check_grammars(self) -> list[RequestUpdate]:
        """Fail the waiting requests whose grammar failed to compile; forget the compiled."""
        failed: dict[str, str] = {}
        still: list[Sequence] = []
        for seq in self._compiling:
            if seq.is_finished:
                continue
            if not seq.grammar.ready:
                still.append(seq)
            elif seq.grammar.failed is not None:
                failed[seq.request_id] = seq.grammar.failed
        self._compiling = still
        return self.scheduler.fail_requests(failed) if failed else []

    def _fill_grammar(self, step: SchedulerOutput) -> bool:
        """Fill the step's grammar mask now if every constrained row's tokens are known;
        True when one waits for a token still being sampled (async scheduling): then the step
        is launched with its sampling deferred until that token is in its matcher."""
        assert step.grammar is not None
        grammars, waits = self.scheduler.step_grammars(step)
        if waits:
            return True
        step.grammar.bitmask = self.structured.fill(grammars)
        return False

    def _sample_deferred(self, launched: _Launched) -> list[RequestUpdate]:
        step = launched.step
        assert step.grammar is not None
        grammars, _ = self.scheduler.step_grammars(step)
        step.grammar.bitmask = self.structured.fill(grammars)
        launched.deferred = False
        try:
            launched.handle = self.executor.sample_deferred(step.grammar)
        except Exception as exc:
            if launched in self._inflight:
                self._inflight.remove(launched)
            return self._isolate_failure(step, exc)
        return []

    def _isolate_failure(self, step: SchedulerOutput, exc: Exception) -> list[RequestUpdate]:
        """A step failed to launch. Fail the requests that caused it (the rows the runner cannot
        build inputs for) and let the others recompute; a failure no row explains fails the
        step's requests. Either way the engine serves on, unless its workers are gone."""
        if not self.executor.alive:
            self._inflight.clear()
            raise exc
        cause = f"{type(exc).__name__}: {exc}"
        culprits = self.executor.driver.find_bad_rows(step)
        if culprits:
            logger.error(
                "engine step failed (%s); failing %d request(s) it cannot run: %s; %d other(s) "
                "recompute",
                cause,
                len(culprits),
                "; ".join(f"{rid}: {why}" for rid, why in culprits.items()),
                len(step.rows) - len(culprits),
            )
            self.scheduler.rollback(step)
            return self.scheduler.fail_requests(culprits)
        logger.error(
            "engine step failed (%s); no single request explains it: failing the step's %d",
            cause,
            len(step.rows),
        )
        return self.scheduler.fail_step(step, f"engine step failed: {cause}")

    def _resolve(self, launched: _Launched) -> tuple[list[RequestUpdate], float]:
        """Wait for a launched step's tokens and hand them to the scheduler; also returns the
        seconds spent waiting for the GPU."""
        t = time.perf_counter()
        try:
            output = launched.handle.result()  # waits for this step only
        except Exception as exc:
            if not self.executor.alive:
                raise
            logger.error("engine step failed on the device (%s: %s)", type(exc).__name__, exc)
            message = f"engine step failed: {type(exc).__name__}: {exc}"
            return self.scheduler.fail_step(launched.step, message), 0.0
        wait_s = time.perf_counter() - t
        self._counts["steps_graph" if output.used_cuda_graph else "steps_eager"] += 1
        updates = self.scheduler.update_from_output(launched.step, output)
        self._counts["generation_tokens"] += sum(len(u.new_token_ids) for u in updates)
        return updates, wait_s

    def _process(self, updates: list[RequestUpdate]) -> list[RequestOutput]:
        if not updates:
            return []
        outputs, stopped = self.output_processor.process(updates)
        for rid, stop in stopped:  # a stop string ended it: its blocks are freed now
            self.scheduler.finish_request(rid, "stop", stop)
        return outputs

    # ---- state and lifecycle ----------------------------------------------------------
    def get_stats(self) -> EngineStats:
        bm, sched, c = self.block_manager, self.scheduler, self._counts
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_blocks,
            prompt_tokens=c["prompt_tokens"],
            generation_tokens=c["generation_tokens"],
            steps=c["steps"],
            steps_graph=c["steps_graph"],
            steps_eager=c["steps_eager"],
            num_preemptions=sched.num_preemptions,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            spec_decode_num_drafts=sched.spec_stats.num_drafts,
            spec_decode_num_draft_tokens=sched.spec_stats.num_draft_tokens,
            spec_decode_num_accepted_tokens=sched.spec_stats.num_accepted_tokens,
        )

    def set_tracer(self, tracer: Tracer) -> None:
        """Spans around each step's phases (schedule, launch and the runner's, resolve)."""
        self.tracer = tracer
        self.executor.driver.tracer = tracer

    def set_cuda_graphs_enabled(self, enabled: bool) -> None:
        """Replay captured graphs (the default) or run every step eagerly; benchmarks compare
        both in one engine. Every rank follows."""
        self.executor.collective_rpc("set_graphs_enabled", enabled)

    def shutdown(self) -> None:
        """Stop the tensor/pipeline-parallel workers, if any (also done at exit)."""
        if self._structured is not None:
            self._structured.shutdown()
        self.executor.shutdown()

    def reset_prefix_cache(self) -> int:
        """Drop the prefix cache's unreferenced blocks (vLLM's `reset_prefix_cache`)."""
        return self.block_manager.reset_prefix_cache()


def _why_no_graphs(driver: Any) -> str:
    if driver.device.type != "cuda":
        return "no CUDA device"
    if driver.parallel.pp_size > 1 and driver.config.use_cuda_graph != "off":
        return "pipeline stages run eagerly (GRAPHWISE_PP_CUDA_GRAPHS=1 captures their graphs)"
    return "graphs turned off (enforce_eager or cuda_graph='off')"
