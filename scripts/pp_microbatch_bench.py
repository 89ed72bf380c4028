"""Pipeline-parallel decode throughput: one batch in flight against micro-batches.

    python scripts/pp_microbatch_bench.py --preset llama3-8b --pp 2 --batch-size 64 \
        --device cuda --dtype bfloat16 --output pp-microbatch-h200x2.json      (two GPUs)
    python scripts/pp_microbatch_bench.py --cpu-proxy --output ...             (a CPU stand-in)

`--batch-size` B is the batch of one step. The modes, each an engine with
pipeline_parallel_size=pp:

- `one-batch`: pipeline_micro_batches=1, B sequences (one batch in flight, the stages take turns);
- `micro`: pipeline_micro_batches=m (default pp), m x B sequences, so each of the m batches in
  flight is a step of B (the scheduler splits the active sequences evenly);
- `one-batch-same-total` (`--same-total`): pipeline_micro_batches=1 with m x B sequences, one
  batch of m x B: as many sequences in flight as `micro`. Where a stage's step costs about the
  same at B and m x B (decode reading its weights, or launching its kernels) this is as fast
  as `micro`; micro-batches win where the step's cost grows with its batch (compute).

The headline ratio is `micro` over `one-batch` (issue 19's target: PP=2 at bs64 >= 1.6x).
Every sequence decodes greedily with ignore_eos from a random `--input-len`-token prompt.

Two ways to time (tokens per second while every sequence decodes; no prefill, no drain):
- sequential (default on GPU): one engine per mode, a warm-up, `--repeats` runs of
  `--output-len` tokens, the median;
- `--paired` (default with --cpu-proxy, for a machine shared with other work): every mode's
  engine stands at once, each in its own process and idle while another runs; `--repeats`
  windows of `--window` tokens per sequence alternate between them (the order flips each
  window), so neighbouring windows share the machine's load of the moment; the ratio is the
  median over windows. Each window also records every engine process's CPU seconds (from
  /proc): `idle_projection` is what the modes would give on an idle machine with a core per
  stage (one batch in flight: the stages take turns, the sum of their CPU per token;
  micro-batches: they overlap, the busiest process's). A projection from measured CPU times.

`--cpu-proxy` writes a small Llama config (hidden 1024, intermediate 4096, 8 layers, vocab
8192, ~140M parameters, dummy fp32 weights: a stage's decode step at batch 64 is tens of
milliseconds of matrix work on one core) and gives rank 0 one torch thread like each worker.
A proxy for the ratio, not for GPU numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphwise import LLM, SamplingParams  # noqa: E402
from graphwise.bench.offline import environment  # noqa: E402

CPU_PROXY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 8192,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
TARGET = "H200 x2, Llama-3-8B shape: PP=2 decode throughput at bs64 >= 1.6x one batch in flight"


@dataclass
class Mode:
    name: str
    options: dict
    num_seqs: int
    runs: list[dict] = field(default_factory=list)


def _commit() -> str:
    env = os.environ.get("GRAPHWISE_COMMIT")
    if env:
        return env
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Standing:
    """An engine decoding a standing set of sequences, timed window by window."""

    def __init__(self, llm: LLM, num_seqs: int, input_len: int, max_tokens: int, seed: int):
        self.llm = llm
        engine = llm.llm_engine
        vocab = engine.model_config.vocab_size
        rng = random.Random(seed)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        self.seqs = []
        for _ in range(num_seqs):
            ids = [rng.randrange(vocab) for _ in range(input_len)]
            rid = engine.add_request(None, params, prompt_token_ids=ids)
            self.seqs.append(engine.scheduler.requests[rid])
        while self._least() < 2:  # past the prefill: every sequence decodes from here
            engine.step()
        self.pids = [os.getpid(), *getattr(engine.executor, "worker_pids", [])]

    def _least(self) -> int:
        return min(s.num_known_output_tokens for s in self.seqs)

    def window(self, tokens: int) -> dict:
        """Decode `tokens` more tokens per sequence: tokens per second, CPU ms per token of
        each engine process (rank 0 first), engine steps."""
        engine = self.llm.llm_engine
        start = sum(s.num_known_output_tokens for s in self.seqs)
        goal = self._least() + tokens
        cpu = [_cpu_seconds(p) for p in self.pids]
        steps_before = engine.get_stats().steps
        t = time.perf_counter()
        while self._least() < goal:
            engine.step()
        elapsed = time.perf_counter() - t
        cpu = [_cpu_seconds(p) - c for p, c in zip(self.pids, cpu, strict=True)]
        done = sum(s.num_known_output_tokens for s in self.seqs) - start
        return {
            "decode_tokens_per_s": round(done / elapsed, 2),
            "cpu_ms_per_token": [round(c / done * 1e3, 4) for c in cpu],
            "engine_steps": engine.get_stats().steps - steps_before,
            "graph_steps": engine.get_stats().steps_graph,
            "load_average_1m": os.getloadavg()[0],
        }

    def finish(self) -> None:
        engine = self.llm.llm_engine
        for s in list(self.seqs):
            engine.abort_request(s.request_id)
        engine.drain()


# ---- sequential: one engine per mode (a dedicated machine) --------------------------------
def _sequential(modes: list[Mode], args: argparse.Namespace) -> None:
    for mode in modes:
        llm = LLM(**mode.options)
        try:
            warm = _Standing(llm, mode.num_seqs, args.input_len, 12, seed=1000)
            warm.window(8)  # compiles, caches, first-step costs
            warm.finish()
            for rep in range(args.repeats):
                standing = _Standing(llm, mode.num_seqs, args.input_len, args.output_len, rep)
                run = standing.window(args.output_len - 4)
                standing.finish()
                mode.runs.append(run)
                print(json.dumps({"mode": mode.name, **run}), flush=True)
        finally:
            llm.shutdown()


# ---- paired windows: a machine shared with other work --------------------------------------
def _paired_child(mode: Mode, settings: dict, conn: Any) -> None:
    try:
        if settings["threads"]:
            import torch

            torch.set_num_threads(settings["threads"])
        llm = LLM(**mode.options)
        standing = _Standing(
            llm, mode.num_seqs, settings["input_len"], settings["max_tokens"], seed=0
        )
        conn.send(("ready",))
        while conn.recv() == "window":
            conn.send(("window", standing.window(settings["window"])))
        llm.shutdown()
    except BaseException as exc:  # report, then exit
        conn.send(("error", repr(exc)))
        raise


def _paired(modes: list[Mode], args: argparse.Namespace) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    settings = {
        "window": args.window,
        "input_len": args.input_len,
        "max_tokens": (args.repeats + 1) * args.window + 8,
        "threads": args.threads,
    }
    children: list[tuple[Mode, Any, Any]] = []

    def ask(conn: Any) -> dict:
        conn.send("window")
        reply = conn.recv()
        if reply[0] != "window":
            raise RuntimeError(f"engine failed: {reply}")
        return reply[1]

    try:
        for mode in modes:  # built one at a time: loading is not timed
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_paired_child, args=(mode, settings, child))
            proc.start()
            children.append((mode, proc, parent))
            reply = parent.recv()
            if reply[0] != "ready":
                raise RuntimeError(f"engine failed: {reply}")
        for _, _, conn in children:
            ask(conn)  # one untimed window each: first-step costs
        for rep in range(args.repeats):
            order = children if rep % 2 == 0 else children[::-1]  # nobody always goes first
            for mode, _, conn in order:
                run = {"window": rep, **ask(conn)}
                mode.runs.append(run)
                print(json.dumps({"mode": mode.name, **run}), flush=True)
    finally:
        for _, proc, conn in children:
            try:
                conn.send("stop")
            except OSError:
                pass
            proc.join(60)
            if proc.is_alive():
                proc.kill()


def _idle_projection(one: Mode, micro: Mode) -> dict:
    """Throughput on an idle machine with a core per stage, from the median CPU ms per token of
    each process: one batch in flight = the stages take turns (sum), micro-batches = they
    overlap (the busiest process). A projection from measured CPU times, not a measurement."""

    def per_process(mode: Mode) -> list[float]:
        columns = zip(*(r["cpu_ms_per_token"] for r in mode.runs), strict=True)
        return [statistics.median(col) for col in columns]

    cpu_one, cpu_micro = per_process(one), per_process(micro)
    return {
        "cpu_ms_per_token_one_batch": [round(x, 4) for x in cpu_one],
        "cpu_ms_per_token_micro": [round(x, 4) for x in cpu_micro],
        "one_batch_tokens_per_s": round(1e3 / sum(cpu_one), 1),
        "micro_tokens_per_s": round(1e3 / max(cpu_micro), 1),
        "micro_over_one_batch": round(sum(cpu_one) / max(cpu_micro), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--cpu-proxy", action="store_true", help="the small CPU stand-in model")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=None, help="m (default: pp)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    parser.add_argument("--same-total", action="store_true", help="add one-batch-same-total")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64, help="tokens per sequential run")
    parser.add_argument("--repeats", type=int, default=3, help="runs, or windows when paired")
    parser.add_argument("--paired", action="store_true", help="default with --cpu-proxy")
    parser.add_argument("--sequential", action="store_true", help="one engine per mode")
    parser.add_argument("--window", type=int, default=4, help="tokens per sequence per window")
    parser.add_argument("--threads", type=int, default=None, help="rank 0's torch threads")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--label", default=None)
    parser.add_argument("--note", default=None, help="free text recorded with the results")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    tmp = None
    if args.cpu_proxy:
        tmp = tempfile.TemporaryDirectory()
        (Path(tmp.name) / "config.json").write_text(json.dumps(CPU_PROXY))
        common: dict = {"model": tmp.name, "load_format": "dummy", "dtype": "float32"}
        common["device"] = "cpu"
        model_desc: dict = {"config": CPU_PROXY, "weights": "dummy"}
        if args.threads is None:
            args.threads = 1
    elif args.preset or args.model:
        common = {"dtype": args.dtype, "device": args.device}
        if args.preset:
            common.update(preset=args.preset, load_format="dummy")
        else:
            common["model"] = args.model
        if args.num_layers:
            common["num_layers"] = args.num_layers
        model_desc = {"preset": args.preset, "model": args.model, "num_layers": args.num_layers}
    else:
        parser.error("one of --preset, --model, --cpu-proxy")
    paired = (args.paired or args.cpu_proxy) and not args.sequential
    m = args.micro_batches or args.pp
    bs = args.batch_size
    longest = (args.repeats + 1) * args.window + 8 if paired else args.output_len
    common.update(max_model_len=args.input_len + longest + 16, enable_prefix_caching=False)

    def mode(name: str, micro: int, seqs: int) -> Mode:
        options = dict(
            common, pipeline_parallel_size=args.pp, pipeline_micro_batches=micro, max_num_seqs=seqs
        )
        return Mode(name, options, seqs)

    modes = [mode("one-batch", 1, bs), mode("micro", m, m * bs)]
    if args.same_total:
        modes.append(mode("one-batch-same-total", 1, m * bs))
    if paired:
        _paired(modes, args)
    else:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        _sequential(modes, args)

    rows = []
    for md in modes:
        rates = [r["decode_tokens_per_s"] for r in md.runs]
        rows.append(
            {
                "mode": md.name,
                "pp": args.pp,
                "micro_batches": md.options["pipeline_micro_batches"],
                "sequences": md.num_seqs,
                "batch_per_step": bs,
                "decode_tokens_per_s": round(statistics.median(rates), 2),
                "decode_tokens_per_s_runs": rates,
            }
        )
    by_name = {md.name: md for md in modes}
    one, micro = by_name["one-batch"], by_name["micro"]
    by_window = [
        round(b["decode_tokens_per_s"] / a["decode_tokens_per_s"], 3)
        for a, b in zip(one.runs, micro.runs, strict=True)
    ]
    ratio = round(statistics.median(by_window), 3)
    device, versions = environment()
    report = {
        "label": args.label,
        "note": args.note,
        "what": f"PP={args.pp} decode throughput, {m} micro-batches of {bs} against one batch of "
        f"{bs} in flight",
        "target": TARGET,
        "timing": (
            f"paired: every mode's engine standing in its own process; {args.repeats} "
            f"alternating windows of {args.window} tokens per sequence; ratio = median over "
            "windows of micro / one-batch in neighbouring windows"
            if paired
            else f"sequential: one engine per mode, a warm-up, {args.repeats} runs of "
            f"{args.output_len} tokens per sequence; ratio = median of run-by-run ratios"
        ),
        "model": model_desc,
        "input_len": args.input_len,
        "rows": rows,
        "micro_over_one_batch": ratio,
        "micro_over_one_batch_by_run": by_window,
        "runs": {md.name: md.runs for md in modes},
        "rank0_torch_threads": args.threads,
        "pp_cuda_graphs": os.environ.get("GRAPHWISE_PP_CUDA_GRAPHS", "0"),
        "device": device,
        "versions": versions,
        "commit": _commit(),
        "cpu_count": os.cpu_count(),
    }
    if paired:
        report["idle_projection"] = _idle_projection(one, micro)
        if args.same_total:
            report["idle_projection_same_total"] = _idle_projection(
                by_name["one-batch-same-total"], micro
            )
    if "one-batch-same-total" in by_name:
        same = by_name["one-batch-same-total"].runs
        report["micro_over_one_batch_same_total"] = round(
            statistics.median(
                b["decode_tokens_per_s"] / a["decode_tokens_per_s"]
                for a, b in zip(same, micro.runs, strict=True)
            ),
            3,
        )
    print(json.dumps({k: report.get(k) for k in ("micro_over_one_batch", "idle_projection")}))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
