"""Data parallelism: `data_parallel_size` engine replicas behind one front.

Each replica is a full LLMEngine (itself tensor/pipeline parallel if asked) in its own process,
on its own GPUs (CUDA_VISIBLE_DEVICES is narrowed to its slice). The front, DataParallelEngine,
is an `EngineClient` like LLMEngine (what the offline API and the server use) and routes each
new request to the replica with the fewest unfinished requests (running + waiting, as the front
counts them). Requests are checked here, before routing, with the engine's own check.

Replicas run freely: each steps whenever it has work and sends its outputs back; the front's
step() returns whatever outputs have arrived (waiting for at least one). Replicas share nothing,
so DP costs no communication per decode step. To keep the pipes light, outputs of running
requests travel without their prompt and full token list; the front rebuilds them from its own
copy of the prompt and the streamed deltas.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing.connection
import os
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from graphwise.config import EngineConfig
from graphwise.core.device import resolve_device
from graphwise.distributed.launcher import watch_parent
from graphwise.engine.client import EngineStats
from graphwise.engine.engine import LLMEngine
from graphwise.engine.mask_fill import default_fill_threads
from graphwise.engine.validation import InvalidRequest, RequestLimits, normalize_request
from graphwise.outputs import CompletionOutput, RequestOutput
from graphwise.sampling_params import SamplingParams
from graphwise.tokenizer import encode_prompt

logger = logging.getLogger(__name__)


# ---- replica process -------------------------------------------------------------------------
def _slim(out: RequestOutput, several: set[str]) -> RequestOutput:
    """What crosses the pipe: no prompt ids, and for a running request no cumulative text or
    token list (the front rebuilds those from the deltas); its logprobs are the step's own. An
    n > 1 request's running outputs (in `several`) are deltas already, each sample's in its own
    CompletionOutput."""
    out.prompt_token_ids = []
    if out.request_id in several:
        if out.finished:
            several.discard(out.request_id)
    elif not out.finished:
        o = out.outputs[0]
        out.outputs[0] = CompletionOutput(
            o.index, "", [], o.finish_reason, o.stop_reason, o.logprobs, o.cumulative_logprob
        )
    return out


def replica_main(
    index: int,
    config: EngineConfig,
    conn: Any,
    parent_pid: int,
    env: dict[str, str],
    num_threads: int | None,
) -> None:
    os.environ.update(env)  # before CUDA initialises: this replica's GPUs only
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    threading.Thread(target=watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        engine = LLMEngine(config)
        conn.send(("ready", {"max_model_len": engine.max_model_len}, engine.get_stats()))
    except BaseException:
        _report_and_exit(conn)
    try:
        _serve_replica(engine, conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the front is gone
    except BaseException:
        _report_and_exit(conn)
    finally:
        engine.shutdown()


def _report_and_exit(conn: Any) -> None:
    try:
        conn.send(("error", traceback.format_exc()))
    except Exception:
        pass
    sys.exit(1)


def _serve_replica(engine: LLMEngine, conn: Any) -> None:
    several: set[str] = set()  # requests with n > 1 samples
    while True:
        commands = []
        if not engine.has_unfinished_requests():
            commands.append(conn.recv())  # idle: wait (end-of-file when the front dies)
        while conn.poll(0):
            commands.append(conn.recv())
        for cmd in commands:
            kind = cmd[0]
            if kind == "shutdown":
                return
            if kind == "abort":
                engine.abort_request(cmd[1])
                several.discard(cmd[1])
            elif kind == "reset_prefix_cache":
                conn.send(("reset_done", engine.reset_prefix_cache()))
            elif kind == "add":
                _, rid, prompt, ids, params = cmd
                try:
                    engine.add_request(prompt, params, prompt_token_ids=ids, request_id=rid)
                except ValueError as exc:
                    conn.send(("rejected", rid, str(exc)))
                else:
                    if params.n > 1:
                        several.add(rid)
        if not engine.has_unfinished_requests():
            continue
        try:
            outputs = engine.step()
        except Exception as exc:
            # The engine could not isolate it (its workers died): fail what this replica holds.
            rids = engine.unfinished_request_ids()
            for rid in rids:
                engine.abort_request(rid)
                several.discard(rid)
            message = f"{type(exc).__name__}: {exc}"
            conn.send(("step_failed", message, rids, engine.get_stats(), engine.alive))
            continue
        conn.send(("outputs", [_slim(o, several) for o in outputs], engine.get_stats()))


# ---- the front -------------------------------------------------------------------------------
@dataclass
class DPRequest:
    request_id: str
    replica: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    n: int = 1  # samples (n > 1: outputs pass through as they come)


class _Replica:
    def __init__(self, index: int, proc: Any, conn: Any) -> None:
        self.index, self.proc, self.conn = index, proc, conn
        self.unfinished = 0
        self.stats = EngineStats()  # as of the replica's last message
        self.dead = False  # its process or its engine's workers are gone: no new requests
        self.requests_routed = 0


class _Replicas:
    """The replica processes, for finalizers: stopped however the front goes away."""

    def __init__(self) -> None:
        self.replicas: list[_Replica] = []
        self.closed = False

    def close(self, grace_s: float = 30.0) -> None:
        if self.closed:
            return
        self.closed = True
        for r in self.replicas:
            try:
                r.conn.send(("shutdown",))
            except Exception:
                pass
        deadline = time.monotonic() + grace_s
        for r in self.replicas:
            r.proc.join(max(0.0, deadline - time.monotonic()))
            if r.proc.is_alive():
                r.proc.terminate()
                r.proc.join(5.0)
            if r.proc.is_alive():
                r.proc.kill()
                r.proc.join(2.0)
            r.conn.close()


def replica_config_of(config: EngineConfig) -> EngineConfig:
    """What each replica's engine runs with: one replica, the front's device resolved, and the
    host's default mask-fill threads shared out among the replicas (each fills its own)."""
    out = dataclasses.replace(config, data_parallel_size=1)
    if resolve_device(config.device).type == "cuda":
        out = dataclasses.replace(out, device="cuda")
    if config.structured_outputs_fill_threads is None:
        share = max(1, default_fill_threads() // config.data_parallel_size)
        out = dataclasses.replace(out, structured_outputs_fill_threads=share)
    return out


def _replica_envs(config: EngineConfig) -> list[dict[str, str]]:
    """Per replica: the CUDA devices it may see (its slice of this process's)."""
    n = config.data_parallel_size
    per = config.tensor_parallel_size * config.pipeline_parallel_size
    device = resolve_device(config.device)
    if device.type != "cuda":
        return [{} for _ in range(n)]
    from graphwise.distributed.launcher import check_device_count

    check_device_count(n * per, device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = (
        [v.strip() for v in visible.split(",") if v.strip()]
        if visible
        else [str(i) for i in range(torch.cuda.device_count())]
    )
    first = device.index or 0
    return [
        {"CUDA_VISIBLE_DEVICES": ",".join(ids[first + r * per : first + (r + 1) * per])}
        for r in range(n)
    ]


class DataParallelEngine:
    def __init__(self, config: EngineConfig) -> None:
        from graphwise.distributed.launcher import torchrun_env
        from graphwise.models.loader import load_tokenizer, model_config_of, resolve_source
        from graphwise.models.model_config import check_parallel_config

        if torchrun_env() is not None:
            raise ValueError("data_parallel_size > 1 is not supported under torchrun")
        self.config = config
        source = resolve_source(config)
        self.model_name = source.name
        self.model_config = model_config_of(source, config)
        check_parallel_config(
            self.model_config, config.tensor_parallel_size, config.pipeline_parallel_size
        )
        self.tokenizer = load_tokenizer(source, config)
        n = config.data_parallel_size
        replica_config = replica_config_of(config)
        envs = _replica_envs(config)
        threads = (
            max(1, (os.cpu_count() or 1) // (n * config.tensor_parallel_size))
            if resolve_device(config.device).type == "cpu"
            else None
        )
        self._pool = _Replicas()
        weakref.finalize(self, self._pool.close)
        self.replicas = self._pool.replicas
        self.requests: dict[str, DPRequest] = {}
        self._ids = itertools.count()
        import torch.multiprocessing as mp

        mpctx = mp.get_context("spawn")
        start = time.perf_counter()
        for i in range(n):
            parent_end, child_end = mpctx.Pipe(duplex=True)
            proc = mpctx.Process(
                target=replica_main,
                args=(i, replica_config, child_end, os.getpid(), envs[i], threads),
                name=f"graphwise-dp{i}",
                daemon=False,  # it may spawn its own tensor-parallel workers
            )
            proc.start()
            child_end.close()
            self.replicas.append(_Replica(i, proc, parent_end))
        try:
            infos = [self._wait_ready(r) for r in self.replicas]
        except BaseException:
            self._pool.close(grace_s=0.0)
            raise
        self.max_model_len = infos[0]["max_model_len"]
        self.request_limits = RequestLimits(
            self.model_config.vocab_size,
            self.max_model_len,
            config.max_logprobs,
            prompt_logprobs=config.pipeline_parallel_size == 1,
        )
        logger.info(
            "Data parallel: %d replicas (tp=%d, pp=%d each) ready in %.1f s",
            n,
            config.tensor_parallel_size,
            config.pipeline_parallel_size,
            time.perf_counter() - start,
        )

    def _wait_ready(self, r: _Replica) -> dict[str, Any]:
        msg = self._recv(r)
        if msg[0] != "ready":
            raise RuntimeError(f"data-parallel replica {r.index} failed to start:\n{msg[1]}")
        r.stats = msg[2]
        return msg[1]

    def _recv(self, r: _Replica) -> Any:
        try:
            return r.conn.recv()
        except (EOFError, OSError):
            r.proc.join(1.0)
            return ("error", f"the process exited (exit code {r.proc.exitcode})")

    # ---- requests -----------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.model_name)

    def add_request(
        self,
        prompt: str | None,
        sampling_params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> str:
        self._check_open()
        params, prompt_token_ids = normalize_request(
            prompt, sampling_params, prompt_token_ids, self.tokenize, self.request_limits
        )
        if params.structured_outputs is not None:  # refused here, not later in a replica
            from graphwise.engine.structured import check_constraint

            try:
                check_constraint(params.structured_outputs)
            except ValueError as exc:
                raise InvalidRequest(str(exc), "structured_outputs") from exc
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        live = [r for r in self.replicas if not r.dead]
        if not live:
            raise RuntimeError("no data-parallel replica is alive")
        replica = min(live, key=lambda r: r.unfinished)  # least loaded, lowest index
        replica.conn.send(("add", request_id, prompt, prompt_token_ids, params))
        replica.unfinished += 1
        replica.requests_routed += 1
        self.requests[request_id] = DPRequest(
            request_id, replica.index, list(prompt_token_ids), n=params.n
        )
        return request_id

    def abort_request(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        replica = self.replicas[req.replica]
        replica.unfinished -= 1
        if not self._pool.closed:
            try:
                replica.conn.send(("abort", request_id))
            except OSError:
                pass
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def drain(self) -> list[RequestOutput]:
        """Each replica drains its own engine in its own loop: nothing to do here."""
        return []

    # ---- one step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """The outputs that replicas have sent since the last call (waits for at least one
        message when requests are in flight)."""
        self._check_open()
        busy = [r.conn for r in self.replicas if r.unfinished > 0]
        if not busy:
            return []
        ready = multiprocessing.connection.wait(busy)
        outputs: list[RequestOutput] = []
        for r in self.replicas:
            if r.conn not in ready:
                continue
            while True:
                try:
                    if not r.conn.poll(0):
                        break
                except (EOFError, OSError):
                    break
                msg = self._recv(r)
                kind = msg[0]
                if kind == "outputs":
                    r.stats = msg[2]
                    for out in msg[1]:
                        restored = self._restore(out)
                        if restored is not None:
                            outputs.append(restored)
                elif kind == "step_failed":  # this replica's requests fail; the others go on
                    _, message, rids, r.stats, alive = msg
                    outputs.extend(self._fail(r, rids, f"replica {r.index}: {message}"))
                    r.dead = r.dead or not alive
                elif kind == "rejected":
                    outputs.extend(self._fail(r, [msg[1]], f"replica {r.index}: {msg[2]}"))
                else:  # "error": the replica's process died
                    r.dead = True
                    rids = [rid for rid, req in self.requests.items() if req.replica == r.index]
                    outputs.extend(self._fail(r, rids, f"replica {r.index} died:\n{msg[1]}"))
                    break
        if not self.alive:
            # A replica whose workers died still owes answers for requests that reached it after
            # the failed step (their "rejected" may not have come yet): fail them here, since
            # nothing more is read once the pool closes.
            for r in self.replicas:
                rids = [rid for rid, req in self.requests.items() if req.replica == r.index]
                outputs.extend(
                    self._fail(
                        r,
                        rids,
                        f"replica {r.index}: its tensor/pipeline-parallel "
                        "workers are gone (failed or shut down)",
                    )
                )
            self._pool.close(grace_s=0.0)
            if not outputs:
                raise RuntimeError("every data-parallel replica has failed")
        return outputs

    def _fail(self, r: _Replica, rids: list[str], message: str) -> list[RequestOutput]:
        """Error outputs for requests a replica could not finish."""
        failed = []
        for rid in rids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            r.unfinished -= 1
            if req.n > 1:
                completions = [CompletionOutput(i, "", [], "error") for i in range(req.n)]
            else:
                completions = [CompletionOutput(0, req.text, list(req.token_ids), "error")]
            failed.append(
                RequestOutput(rid, None, req.prompt_token_ids, completions, True, error=message)
            )
        return failed

    def _restore(self, out: RequestOutput) -> RequestOutput | None:
        req = self.requests.get(out.request_id)
        if req is None:
            return None  # aborted while this output was on its way
        out.prompt_token_ids = req.prompt_token_ids
        req.token_ids.extend(out.delta_token_ids)
        req.text += out.delta_text
        if out.finished:
            del self.requests[out.request_id]
            self.replicas[req.replica].unfinished -= 1
        elif req.n == 1:
            o = out.outputs[0]
            out.outputs[0] = dataclasses.replace(o, text=req.text, token_ids=list(req.token_ids))
        return out

    # ---- introspection / lifecycle ------------------------------------------------------------
    def _check_open(self) -> None:
        if self._pool.closed:
            raise RuntimeError("the data-parallel engine is shut down")

    def shutdown(self) -> None:
        self._pool.close()

    @property
    def alive(self) -> bool:
        return not self._pool.closed and any(not r.dead for r in self.replicas)

    def get_stats(self) -> EngineStats:
        total = EngineStats.total([r.stats for r in self.replicas])
        # Requests the replicas have not reported yet count as waiting.
        unseen = len(self.requests) - total.num_running - total.num_waiting
        return dataclasses.replace(total, num_waiting=total.num_waiting + max(0, unseen))

    def reset_prefix_cache(self) -> int:
        """Every replica's; like vLLM, only while no request is in flight."""
        self._check_open()
        if self.requests:
            raise RuntimeError("reset_prefix_cache needs an idle engine (requests are in flight)")
        live = [r for r in self.replicas if not r.dead]
        for r in live:
            r.conn.send(("reset_prefix_cache",))
        total = 0
        for r in live:
            while True:  # skip what a replica sent after its last request (an empty drain step)
                msg = self._recv(r)
                if msg[0] not in ("outputs", "step_failed"):
                    break
                r.stats = msg[-1] if msg[0] == "outputs" else msg[3]
            if msg[0] != "reset_done":
                self._pool.close(grace_s=0.0)
                raise RuntimeError(f"data-parallel replica {r.index} failed:\n{msg[1]}")
            total += msg[1]
        return total
