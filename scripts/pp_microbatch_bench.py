"""Pipeline-parallel decode throughput: one batch in flight against micro-batches.

    python scripts/pp_microbatch_bench.py --preset llama3-8b --pp 2 --batch-size 64 \
        --output benchmarks/results/pp-microbatch-h200x2.json          (two GPUs)
    python scripts/pp_microbatch_bench.py --cpu-proxy --output ...     (a CPU stand-in)

For each `--micro-batches` value m (default 1 and pp) an engine with pipeline_parallel_size=pp
and pipeline_micro_batches=m decodes `--batch-size` sequences (random prompts of `--input-len`
tokens, greedy, ignore_eos). Decode throughput is counted while every sequence decodes (after each has its
first two tokens, until the first is two short of its end: no prefill, no drain), on a fresh
engine per run after a warm-up, the modes alternating; the median of `--repeats` runs.

`--cpu-proxy` writes a small Llama config (hidden 512, 8 layers, vocab 8192; dummy fp32
weights) so that each stage has real matrix work on a CPU core: the stages are processes with
one thread each, overlapping only if the machine has a core per stage to spare. It is a proxy
for the ratio, not for GPU numbers.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphwise import LLM, SamplingParams  # noqa: E402
from graphwise.bench.offline import environment  # noqa: E402

PAIRED_METHOD = (
    "{bs} random {input_len}-token prompts decoding (greedy, ignore_eos) as one standing batch "
    "per mode, each mode's engine in its own process (idle while another runs); {windows} "
    "alternating windows of {window} tokens per sequence per mode (the order flips every "
    "window); tokens per second per window; the ratio is the median over windows of micro / "
    "one-batch in the same pair of neighbouring windows"
)
CPU_PROXY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def _commit() -> str:
    env = os.environ.get("GRAPHWISE_COMMIT")
    if env:
        return env
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def _decode_rate(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    """Tokens per second while every sequence decodes: from the step after which each has its
    first two tokens to the one after which the first reaches output_len - 2 (no prefill, no
    drain); and the number of engine steps in that window."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    rids = [engine.add_request(None, params, prompt_token_ids=p) for p in prompts]
    seqs = [engine.scheduler.requests[r] for r in rids]
    t0 = n0 = None
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        done = [s.num_known_output_tokens for s in seqs]
        if t0 is None:
            if min(done) >= 2:
                t0, n0 = time.perf_counter(), sum(done)
            continue
        steps += 1
        if max(done) >= output_len - 2:
            rate = (sum(done) - n0) / (time.perf_counter() - t0)
            while engine.has_unfinished_requests():
                engine.step()
            return rate, steps
    raise RuntimeError("the decode window never opened: raise --output-len")


def _measure(options: dict, args: argparse.Namespace, vocab: int, seeds: list[int]) -> list[dict]:
    """One engine: a warm-up generation, then one timed run per seed."""
    bs = args.batch_size
    llm = LLM(**options)
    runs = []
    try:
        engine = llm.llm_engine
        rng = random.Random(1000 + seeds[0])
        warm = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(bs)]
        _decode_rate(llm, warm, 8)
        for seed in seeds:
            # fresh prompts each run: no prefix-cache hit makes a run's prefill cheaper
            rng = random.Random(seed)
            prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(bs)]
            rate, steps = _decode_rate(llm, prompts, args.output_len)
            runs.append(
                {
                    "pp": options.get("pipeline_parallel_size", 1),
                    "micro_batches": engine.num_micro_batches,
                    "batch_size": bs,
                    "decode_tokens_per_s": round(rate, 2),
                    # wall time per decode step of the whole batch (each sequence's next token)
                    "decode_ms_per_batch_step": round(bs / rate * 1e3, 3),
                    "engine_steps": steps,
                    "graph_steps": engine.get_stats().steps_graph,
                    "load_average_1m": os.getloadavg()[0],
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    finally:
        llm.shutdown()
    return runs


# ---- paired windows: a machine shared with other work --------------------------------------
def _paired_child(options: dict, args_dict: dict, vocab: int, conn: Any) -> None:
    """One engine decoding a standing batch; each "window" request decodes `window` more tokens
    per sequence and answers with tokens per second."""
    try:
        bs, window = args_dict["batch_size"], args_dict["window"]
        llm = LLM(**options)
        engine = llm.llm_engine
        rng = random.Random(0)
        params = SamplingParams(temperature=0, max_tokens=args_dict["max_tokens"], ignore_eos=True)
        seqs = []
        for _ in range(bs):
            ids = [rng.randrange(vocab) for _ in range(args_dict["input_len"])]
            rid = engine.add_request(None, params, prompt_token_ids=ids)
            seqs.append(engine.scheduler.requests[rid])
        while min(s.num_known_output_tokens for s in seqs) < 2:  # past the prefill
            engine.step()
        conn.send(("ready", engine.num_micro_batches))
        while conn.recv() == "window":
            start = sum(s.num_known_output_tokens for s in seqs)
            goal = min(s.num_known_output_tokens for s in seqs) + window
            t = time.perf_counter()
            while min(s.num_known_output_tokens for s in seqs) < goal:
                engine.step()
            elapsed = time.perf_counter() - t
            done = sum(s.num_known_output_tokens for s in seqs) - start
            conn.send((done / elapsed, os.getloadavg()[0]))
        llm.shutdown()
    except BaseException as exc:  # report, then exit
        conn.send(("error", repr(exc)))
        raise


def _paired(modes: list[dict], args: argparse.Namespace, vocab: int) -> list[dict]:
    """Every mode's engine is built first (each in its own process, idle while another runs);
    then windows alternate between them, so neighbouring windows share the machine's load of
    the moment."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    args_dict = {
        "batch_size": args.batch_size,
        "window": args.window,
        "input_len": args.input_len,
        "max_tokens": args.output_len,
    }
    children: list[tuple[dict, Any, Any]] = []
    try:
        for options in modes:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_paired_child, args=(options, args_dict, vocab, child))
            proc.start()
            reply = parent.recv()
            if reply[0] != "ready":
                raise RuntimeError(f"engine failed: {reply}")
            children.append((dict(options, micro=reply[1]), proc, parent))
        for _, _, conn in children:  # one untimed window each: first-step costs are not timed
            conn.send("window")
            if conn.recv()[0] == "error":
                raise RuntimeError("engine failed in its warm-up window")
        runs = []
        for rep in range(args.repeats):
            order = children if rep % 2 == 0 else children[::-1]  # neither always goes first
            for options, _, conn in order:
                conn.send("window")
                reply = conn.recv()
                if reply[0] == "error":
                    raise RuntimeError(f"engine failed: {reply}")
                rate, load = reply
                runs.append(
                    {
                        "pp": options.get("pipeline_parallel_size", 1),
                        "micro_batches": options["micro"],
                        "batch_size": args.batch_size,
                        "window": rep,
                        "decode_tokens_per_s": round(rate, 2),
                        "decode_ms_per_batch_step": round(args.batch_size / rate * 1e3, 3),
                        "load_average_1m": load,
                    }
                )
                print(json.dumps(runs[-1]), flush=True)
        return runs
    finally:
        for _, proc, conn in children:
            try:
                conn.send("stop")
            except OSError:
                pass
            proc.join(60)
            if proc.is_alive():
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--cpu-proxy", action="store_true", help="the small CPU stand-in model")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--micro-batches", default=None, help="comma list (default: 1,pp)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--single", action="store_true", help="also time pp=1 (one process)")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="every mode's engine standing at once (each in its own process, one running at a "
        "time), timed in alternating windows of --window tokens per sequence, --repeats "
        "windows each: for a machine shared with other work (default with --cpu-proxy)",
    )
    parser.add_argument("--window", type=int, default=8, help="tokens per sequence per window")
    parser.add_argument(
        "--engine-per-run",
        action="store_true",
        help="a fresh engine for every run, the modes alternating (a machine whose load drifts; "
        "default with --cpu-proxy); else one engine per mode for all its runs",
    )
    parser.add_argument("--label", default=None)
    parser.add_argument("--note", default=None, help="free text recorded with the results")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    tmp = None
    model_desc: dict = {}
    if args.cpu_proxy:
        tmp = tempfile.TemporaryDirectory()
        (Path(tmp.name) / "config.json").write_text(json.dumps(CPU_PROXY))
        common = {"model": tmp.name, "load_format": "dummy", "dtype": "float32", "device": "cpu"}
        model_desc = {"config": CPU_PROXY, "weights": "dummy"}
        vocab = CPU_PROXY["vocab_size"]
    else:
        common = {"dtype": args.dtype, "device": args.device, "load_format": "dummy"}
        if args.preset:
            common["preset"] = args.preset
        elif args.model:
            common = {"model": args.model, "dtype": args.dtype, "device": args.device}
        else:
            parser.error("one of --preset, --model, --cpu-proxy")
        if args.num_layers:
            common["num_layers"] = args.num_layers
        model_desc = {"preset": args.preset, "model": args.model, "num_layers": args.num_layers}
        vocab = 32000
    paired = args.paired or (args.cpu_proxy and not args.engine_per_run)
    if paired:  # one standing batch decodes every window: room for all of them
        args.output_len = max(args.output_len, args.repeats * args.window + 8)
    common.update(
        max_num_seqs=args.batch_size,
        max_model_len=args.input_len + args.output_len + 16,
        enable_prefix_caching=False,
    )
    micro = [int(m) for m in (args.micro_batches or f"1,{args.pp}").split(",")]
    modes = [dict(common)] if args.single else []
    modes += [dict(common, pipeline_parallel_size=args.pp, pipeline_micro_batches=m) for m in micro]
    runs: list[dict] = []
    per_run = args.engine_per_run
    if paired:
        runs = _paired(modes, args, vocab)
    elif per_run:
        for rep in range(args.repeats):  # modes alternate: the machine's load drift is shared
            for options in modes:
                runs += _measure(options, args, vocab, [rep])
    else:
        for options in modes:
            runs += _measure(options, args, vocab, list(range(args.repeats)))
    rows = []
    for key in dict.fromkeys((r["pp"], r["micro_batches"]) for r in runs):
        same = [r for r in runs if (r["pp"], r["micro_batches"]) == key]
        rates = [r["decode_tokens_per_s"] for r in same]
        rate = statistics.median(rates)
        rows.append(
            {
                "pp": key[0],
                "micro_batches": key[1],
                "batch_size": args.batch_size,
                "decode_tokens_per_s": round(rate, 2),
                "decode_ms_per_batch_step": round(args.batch_size / rate * 1e3, 3),
                "decode_tokens_per_s_runs": rates,
            }
        )
    by_m = {r["micro_batches"]: r for r in rows if r["pp"] == args.pp}
    ratio = None
    pair_ratios: list[float] = []
    if 1 in by_m and len(by_m) > 1:
        best = max(m for m in by_m if m > 1)
        ratio = round(by_m[best]["decode_tokens_per_s"] / by_m[1]["decode_tokens_per_s"], 3)
        if paired:  # neighbouring windows share the machine's load: compare them pairwise
            one = [r for r in runs if r["pp"] == args.pp and r["micro_batches"] == 1]
            many = [r for r in runs if r["pp"] == args.pp and r["micro_batches"] == best]
            pair_ratios = [
                round(b["decode_tokens_per_s"] / a["decode_tokens_per_s"], 3)
                for a, b in zip(one, many, strict=True)
            ]
            ratio = round(statistics.median(pair_ratios), 3)
    device, versions = environment()
    report = {
        "label": args.label,
        "note": args.note,
        "what": (
            f"PP={args.pp} decode throughput at batch {args.batch_size}: one batch in flight "
            "(pipeline_micro_batches=1) against micro-batches"
        ),
        "method": PAIRED_METHOD.format(
            bs=args.batch_size, input_len=args.input_len, windows=args.repeats, window=args.window
        )
        if paired
        else (
            f"{args.batch_size} random {args.input_len}-token prompts decoding {args.output_len} "
            "tokens (greedy, ignore_eos) through engine.step(); tokens per second from when "
            "every sequence has 2 tokens until the first has output_len - 2 (no prefill, no "
            "drain), after a warm-up generation; "
            + (
                "a fresh engine per run, the modes alternating; "
                if per_run
                else "one engine per mode; "
            )
            + f"median of {args.repeats} runs"
        ),
        "target": "H200 x2: PP=2 decode throughput at bs64 >= 1.6x one batch in flight",
        "model": model_desc,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "rows": rows,
        "runs": runs,
        "pp_cuda_graphs": os.environ.get("GRAPHWISE_PP_CUDA_GRAPHS", "0"),
        "micro_over_one_batch": ratio,
        "micro_over_one_batch_by_window": pair_ratios,
        "device": device,
        "versions": versions,
        "commit": _commit(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
    }
    print(json.dumps({"micro_over_one_batch": ratio}))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
