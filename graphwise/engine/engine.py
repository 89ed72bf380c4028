"""LLMEngine: requests in, one scheduling + model step at a time, outputs out.

Used directly by the offline API (`LLM`) and, behind a thread, by the server.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from graphwise.config import EngineConfig
from graphwise.engine.block_manager import BlockManager
from graphwise.engine.detokenizer import detokenize_incrementally
from graphwise.engine.scheduler import ScheduledBatch, Scheduler
from graphwise.engine.sequence import Sequence, SequenceStatus
from graphwise.insight.step_log import StepLog, StepRecord
from graphwise.models.loader import build_model, load_tokenizer, resolve_source
from graphwise.models.model_config import ModelConfig
from graphwise.outputs import CompletionOutput, RequestMetrics, RequestOutput
from graphwise.runner.graph_policy import plan_cuda_graphs
from graphwise.runner.memory import plan_kv_blocks
from graphwise.runner.model_runner import ModelRunner, StepHandle
from graphwise.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r} is not a valid torch device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device, config_dtype: torch.dtype | None) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # CPU: exact and fast enough; also what the HF oracle runs
    if config_dtype in (torch.float16, torch.bfloat16):
        return config_dtype
    return torch.bfloat16


@dataclass
class _Launched:
    batch: ScheduledBatch
    handle: StepHandle
    prefill_tokens: int
    context_tokens: int  # KV positions the step reads, summed over its sequences


def check_request(
    front: Any,
    prompt: str | None,
    sampling_params: SamplingParams | None,
    prompt_token_ids: list[int] | None,
    request_id: str | None,
) -> tuple[SamplingParams, list[int], str]:
    """Validate a new request and fill in its defaults; shared by LLMEngine and the
    data-parallel front (`front` has tokenize, validate_prompt, requests and _ids)."""
    params = sampling_params or SamplingParams()
    if not isinstance(params, SamplingParams):
        raise ValueError("sampling_params must be a SamplingParams")
    if prompt_token_ids is None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        prompt_token_ids = front.tokenize(prompt)
    front.validate_prompt(prompt_token_ids)
    request_id = request_id if request_id is not None else str(next(front._ids))
    if request_id in front.requests:
        raise ValueError(f"request_id {request_id!r} is already in use")
    return params, prompt_token_ids, request_id


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        source = resolve_source(config)
        self.model_name = source.name
        declared = ModelConfig.from_dict(source.config)
        self.dtype = resolve_dtype(config.dtype, self.device, declared.torch_dtype)
        if config.data_parallel_size > 1:
            raise ValueError(
                "data_parallel_size > 1 runs several engines: build it with "
                "graphwise.distributed.dp.create_engine(config) (LLM does)"
            )
        self.tokenizer = load_tokenizer(source, config)
        # Tensor/pipeline parallelism: this process is rank 0 and its runner drives the others.
        parallel = None
        if config.tensor_parallel_size * config.pipeline_parallel_size > 1:
            from graphwise.distributed.launcher import launch_parallel_runner

            parallel = launch_parallel_runner(config, source, self.device, self.dtype)
            model, self.model_config = parallel.model, parallel.full_model_config
            self.device = parallel.device
        else:
            model, self.model_config = build_model(source, config, self.device, self.dtype)
        mc = self.model_config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) exceeds the model's "
                f"max_position_embeddings ({mc.max_position_embeddings})"
            )
        self.eos_token_ids = self._eos_ids(source)
        self.max_num_batched_tokens = config.max_num_batched_tokens or max(
            2048, config.max_num_seqs
        )
        if not config.enable_chunked_prefill:
            self.max_num_batched_tokens = max(self.max_num_batched_tokens, self.max_model_len)

        self.runner = parallel or ModelRunner(config, model, mc, self.device, self.dtype)
        if self.tokenizer is not None and len(self.tokenizer) < mc.vocab_size:
            # e.g. a preset (dummy weights) served with a small stand-in tokenizer
            self.runner.vocab_limit = len(self.tokenizer)
            logger.info(
                "tokenizer has %d ids, the model %d: sampling is limited to the tokenizer's",
                len(self.tokenizer),
                mc.vocab_size,
            )
        # Graphs first: the auto policy times them and measures the kept graphs' pool, which the
        # memory plan then holds back from the KV pool.
        self.graph_plan = plan_cuda_graphs(self)
        self.memory_plan = plan_kv_blocks(self, self.runner, self.graph_plan)
        num_blocks = self.memory_plan.num_blocks
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * config.block_size} tokens, fewer than "
                f"max_model_len ({self.max_model_len}): raise gpu_memory_utilization / "
                "kv_cache_memory or lower max_model_len"
            )
        self.runner.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            self.max_num_batched_tokens,
            config.enable_chunked_prefill,
        )
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.async_scheduling = config.async_scheduling
        self._inflight: _Launched | None = None
        self.step_log: StepLog | None = None  # set to record where each step's time goes
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}
        if parallel is not None:
            parallel.setup_cuda_graphs(self.max_model_len)  # every rank captures
        else:
            self._setup_cuda_graphs()

    def _setup_cuda_graphs(self) -> None:
        mode = self.config.use_cuda_graph
        if self.device.type != "cuda":
            if mode == "on":
                raise ValueError("cuda_graph='on' needs a CUDA device; use 'off' or 'auto'")
            if mode == "auto":
                logger.info("cuda_graph=auto: no CUDA device, decode runs eagerly")
            return
        if mode == "off":
            logger.info("CUDA graphs off (enforce_eager or cuda_graph='off')")
            return
        from graphwise.runner.cuda_graph import CudaGraphRunner

        plan = self.graph_plan  # None: capture every bucket (cuda_graph="on", KV size fixed)
        if plan is not None and not plan.kept:
            logger.info(
                "CUDA graphs: no bucket is %.2fx faster as a graph: decode runs eagerly",
                plan.min_speedup,
            )
            return
        runner = CudaGraphRunner(
            self.runner,
            self.config,
            self.max_model_len,
            buckets=plan.kept if plan is not None else None,
            eager_buckets=plan.eager_buckets if plan is not None else None,
        )
        stats = runner.capture_all()
        if plan is not None:
            plan.record_capture(stats)
        self.runner.graph_runner = runner if runner.graphs else None

    def _eos_ids(self, source: Any) -> frozenset[int]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        if source.kind == "hf":
            import json

            gen = source.path / "generation_config.json"
            if gen.is_file():
                eos = json.loads(gen.read_text()).get("eos_token_id")
                if eos is not None:
                    ids.update([eos] if isinstance(eos, int) else eos)
        return frozenset(ids)

    # ---- requests ---------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(
                f"model {self.model_name!r} has no tokenizer (dummy weights): "
                "pass prompt_token_ids instead of text"
            )
        return list(self.tokenizer.encode(prompt, add_special_tokens=True))

    def add_request(
        self,
        prompt: str | None,
        sampling_params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> Sequence:
        params, prompt_token_ids, request_id = check_request(
            self, prompt, sampling_params, prompt_token_ids, request_id
        )
        seq = Sequence(request_id, prompt, prompt_token_ids, params, self.eos_token_ids)
        if params.max_tokens is not None:
            seq.max_total_tokens = min(
                self.max_model_len, seq.num_prompt_tokens + params.max_tokens
            )
        else:
            seq.max_total_tokens = self.max_model_len
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def validate_prompt(self, ids: list[int]) -> None:
        if not isinstance(ids, list) or not ids:
            raise ValueError("prompt_token_ids must be a non-empty list of token ids")
        vocab = self.model_config.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt_token_ids contains {t!r}, not a token id in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens, too long for max_model_len={self.max_model_len} "
                "(it must leave room for at least one generated token)"
            )

    def abort_request(self, request_id: str) -> bool:
        seq = self.requests.pop(request_id, None)
        if seq is None or seq.is_finished:
            return False
        self.scheduler.abort(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        return True

    def drain(self) -> list[RequestOutput]:
        """Resolve the step still in flight when no request is left to schedule (with async
        scheduling the last step() of a batch leaves one, sampled for sequences that then
        finished). Returns its outputs (usually none)."""
        outputs: list[RequestOutput] = []
        while self._inflight is not None and not self.scheduler.has_unfinished():
            outputs.extend(self.step())
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ---- one step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step; return the outputs of the step that completed.

        With async scheduling the step launched here runs on the GPU while the host resolves
        the previous one (waits for its tokens, detokenizes, checks stops) and, on the next
        call, schedules the one after: the host's per-step work hides behind the GPU's.
        Without it, the step launched here is resolved before returning."""
        try:
            return self._step()
        except BaseException:
            # A failed step leaves the step in flight unknowable; callers abort its requests.
            self._inflight = None
            raise

    def _step(self) -> list[RequestOutput]:
        log = self.step_log
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        t1 = time.perf_counter()
        launched = self._launch(batch) if batch.seqs else None
        t2 = time.perf_counter()
        if self.async_scheduling:
            previous, self._inflight = self._inflight, launched
        else:
            previous = launched
        if previous is None:
            if launched is None and self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("scheduler cannot admit any waiting request (KV pool too small)")
            outputs: list[RequestOutput] = []
            wait_s = 0.0
        else:
            outputs, wait_s = self._resolve(previous)
        if log is not None:
            t3 = time.perf_counter()
            log.add(
                StepRecord(
                    seqs=len(batch.seqs),
                    tokens=batch.num_tokens,
                    prefill_tokens=launched.prefill_tokens if launched else 0,
                    context_tokens=launched.context_tokens if launched else 0,
                    schedule_s=t1 - t0,
                    launch_s=t2 - t1,
                    wait_s=wait_s,
                    process_s=t3 - t2 - wait_s,
                    total_s=t3 - t0,
                )
            )
        return outputs

    def _launch(self, batch: ScheduledBatch) -> _Launched:
        prefill = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                prefill += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
        self.stats["prompt_tokens"] += prefill
        handle = self.runner.launch(batch)
        self.stats["steps"] += 1
        context = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            context += seq.num_computed_tokens
        for row, seq in enumerate(handle.sample_seqs):
            seq.num_placeholders += 1
            seq.pending_row = row
        return _Launched(batch, handle, prefill, context)

    def _resolve(self, step: _Launched) -> tuple[list[RequestOutput], float]:
        """Wait for a launched step's tokens and turn them into outputs; also returns the
        seconds spent waiting for the GPU."""
        t = time.perf_counter()
        tokens = step.handle.result()  # waits for this step only
        wait_s = time.perf_counter() - t
        live: list[tuple[Sequence, int]] = []
        for seq, token in zip(step.handle.sample_seqs, tokens, strict=True):
            if seq.is_finished:  # finished or aborted while this step ran: nothing to add
                continue
            seq.num_placeholders -= 1
            seq.append_token(token)
            live.append((seq, token))
        for seq in step.batch.seqs:
            if not seq.is_finished:
                self.block_manager.cache_full_blocks(seq)
        outputs = []
        now = time.monotonic()
        for seq, token in live:
            self.stats["generation_tokens"] += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            delta_text = self._process_token(seq, token)
            if seq.is_finished:
                # A token the next step is already sampling for it is dropped with its KV.
                seq.num_placeholders = 0
                seq.num_computed_tokens = min(seq.num_computed_tokens, len(seq.token_ids))
                self.scheduler.finish(seq)
                self.requests.pop(seq.request_id, None)
            outputs.append(self._make_output(seq, delta_text, [token]))
        return outputs, wait_s

    def _process_token(self, seq: Sequence, token: int) -> str:
        """Detokenize, then apply stop conditions. Returns the text to stream for this step."""
        p = seq.sampling_params
        before = len(seq.output_text)
        detokenize_incrementally(self.tokenizer, seq, p.skip_special_tokens)
        n_out = seq.num_known_output_tokens
        if n_out >= p.min_tokens:
            if token in (p.stop_token_ids or ()):
                seq.finish_reason, seq.stop_reason = "stop", token
            elif not p.ignore_eos and token in seq.eos_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", None
            elif p.stop_strings:
                self._check_stop_strings(seq, before)
        if seq.finish_reason is None and (
            (p.max_tokens is not None and n_out >= p.max_tokens)
            or len(seq.token_ids) >= self.max_model_len
        ):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.status = SequenceStatus.FINISHED
        # Hold back text that could still turn out to start a stop string.
        hold = 0 if seq.is_finished else max((len(s) for s in p.stop_strings), default=1) - 1
        visible = max(seq.reported_text_len, len(seq.output_text) - hold)
        delta = seq.output_text[seq.reported_text_len : visible]
        seq.reported_text_len = visible
        return delta

    @staticmethod
    def _check_stop_strings(seq: Sequence, before: int) -> None:
        text = seq.output_text
        for stop in seq.sampling_params.stop_strings:
            idx = text.find(stop, max(0, before - len(stop) + 1))
            if idx != -1:
                seq.output_text = text[:idx]
                seq.finish_reason, seq.stop_reason = "stop", stop
                return

    def _make_output(self, seq: Sequence, delta_text: str, delta_ids: list[int]) -> RequestOutput:
        # Like vLLM's DELTA output kind: a running request's output carries only what this step
        # added (copying the whole text and token list every step would cost O(length^2) per
        # request); the final output carries everything.
        done = seq.is_finished
        completion = CompletionOutput(
            index=0,
            text=seq.output_text if done else delta_text,
            token_ids=seq.output_token_ids if done else delta_ids,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            outputs=[completion],
            finished=done,
            num_cached_tokens=seq.num_cached_tokens,
            metrics=RequestMetrics(
                arrival_time=seq.arrival_time,
                first_scheduled_time=seq.first_scheduled_time,
                first_token_time=seq.first_token_time,
                finished_time=seq.finished_time,
            ),
            delta_text=delta_text,
            delta_token_ids=delta_ids,
        )

    def shutdown(self) -> None:
        """Stop the tensor/pipeline-parallel workers, if any (also done at exit)."""
        close = getattr(self.runner, "shutdown", None)
        if close is not None:
            close()

    def reset_prefix_cache(self) -> int:
        """Drop the prefix cache's unreferenced blocks (vLLM's `reset_prefix_cache`)."""
        return self.block_manager.reset_prefix_cache()

    # ---- introspection ----------------------------------------------------------------
    def kv_usage(self) -> float:
        return self.block_manager.usage

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)
