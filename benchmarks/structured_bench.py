"""Structured output's cost on the decode step (issue 20): batch B, every row under a JSON
schema vs no row constrained, same engine, same prompt lengths; async scheduling and graphs as
configured. Reports the median per-step wall time of full-batch decode steps (the engine's
step log), the host time spent filling masks, and the grammar compile times.

    python benchmarks/structured_bench.py --preset qwen2.5-7b --tokenizer DIR --batch 64

`--fill-only` needs no model and no GPU: it times the engine's per-step mask fill
(`StructuredOutputs.fill`) alone, for 1 / 8 / 64 rows of SCHEMA mid-generation, with 1 / 2 /
auto fill threads, against the previous fill (xgrammar's BatchGrammarMatcher starting its own
threads on every call, after a `torch.full`). Rows sit at valid prefixes of two kinds: real
JSON text cut at random token positions, and random allowed tokens (what dummy weights
sample, as in the H200 run).

    python benchmarks/structured_bench.py --fill-only --vocab-sizes 49152,152064 \
        --out benchmarks/results/structured-fill-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import time

from graphwise import LLM, SamplingParams, StructuredOutputsParams
from graphwise.core.tracing import StepRecord
from graphwise.insight.system import environment

# An extraction-style schema whose output is long enough to decode many full-batch steps.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer"},
        "summary": {"type": "string", "minLength": 600},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "year", "summary", "tags"],
}


class Log(list):
    def add(self, record: StepRecord) -> None:
        self.append(record)


def run(llm: LLM, batch: int, prompt_len: int, output_len: int, constrained: bool) -> dict:
    engine = llm.llm_engine
    prompts = [{"prompt_token_ids": [100 + (i * 7 + j) % 5000 for j in range(prompt_len)]}
               for i in range(batch)]  # fmt: skip
    params = [
        SamplingParams(
            temperature=1.0, seed=i, max_tokens=output_len, ignore_eos=True,
            structured_outputs=StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
            if constrained else None,
        )
        for i in range(batch)
    ]  # fmt: skip
    log = Log()
    engine.step_log = log
    so = engine.structured
    fill0, n0 = so.fill_s, so.num_fills
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t
    engine.step_log = None
    records = [r for r in log if r.seqs == batch and r.prefill_tokens == 0][5:]
    full = [r.total_s for r in records]
    phases = (
        {
            f"{name}_ms_median": 1e3 * statistics.median(getattr(r, f"{name}_s") for r in records)
            for name in ("schedule", "launch", "wait", "process")
        }
        if records
        else {}
    )
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    valid = None
    if constrained:  # every output (cut at max_tokens or complete) is one xgrammar accepts
        import xgrammar as xgr

        compiler = xgr.GrammarCompiler(
            xgr.TokenizerInfo.from_huggingface(
                engine.tokenizer, vocab_size=engine.model_config.vocab_size
            )
        )
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)

        def tokens_ok(ids: list[int]) -> bool:
            m = xgr.GrammarMatcher(compiled)
            return all(m.accept_token(t) for t in ids)

        # By token ids: what the engine masked; by text: also what detokenizing made of them.
        valid = {
            "by_token_ids": sum(tokens_ok(o.outputs[0].token_ids) for o in outs),
            "by_text": sum(
                xgr.GrammarMatcher(compiled).accept_string(o.outputs[0].text) for o in outs
            ),
        }
    return {
        "constrained": constrained,
        "full_batch_decode_steps": len(full),
        "step_ms_median": 1e3 * statistics.median(full) if full else None,
        "step_ms_mean": 1e3 * statistics.fmean(full) if full else None,
        **phases,
        "mask_fill_ms_per_step": 1e3 * (so.fill_s - fill0) / max(1, so.num_fills - n0),
        **_fill_percentiles(list(so.recent_fill_s)[-(so.num_fills - n0) :] if constrained else []),
        "wall_s": wall,
        "output_tokens_min_mean": [min(lengths), statistics.fmean(lengths)],
        "finish_reasons": sorted({o.outputs[0].finish_reason for o in outs}),
        "outputs_the_grammar_accepts": valid,
    }


def _fill_percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    q = statistics.quantiles(seconds, n=10) if len(seconds) > 1 else seconds * 9
    return {"mask_fill_ms_median": 1e3 * statistics.median(seconds), "mask_fill_ms_p90": 1e3 * q[8]}


# ---- --fill-only: the mask fill alone, on this CPU -------------------------------------------

# Words of the documents' strings. No escapes: xgrammar's strings with a length bound
# (maxLength / minLength) admit unescaped characters only.
WORDS = ("the model of a quick brown fox jumps over lazy dog in 2024 with JSON output and text "
         "naïve café résumé, numbers 3.14 and 42; (parentheses) [brackets] {braces} 東京 "
         "données 50% e-mail: a@b.org").split(" ")  # fmt: skip


def _document(rng: random.Random) -> str:
    """A JSON text SCHEMA accepts, as the engine's grammar spells it (no free whitespace)."""
    title = " ".join(rng.choice(WORDS) for _ in range(4))[:40]
    summary = " ".join(rng.choice(WORDS) for _ in range(200))
    while len(summary) < 600:
        summary += " " + rng.choice(WORDS)
    doc = {"title": title, "year": rng.randint(1800, 2030), "summary": summary,
           "tags": [rng.choice(WORDS) for _ in range(rng.randint(0, 4))]}  # fmt: skip
    return json.dumps(doc, ensure_ascii=False)


def _rows(so, compiled, tokenizer, kind: str, count: int, seed: int) -> list:
    """`count` matchers of SCHEMA at valid mid-generation prefixes."""
    import numpy as np
    import xgrammar as xgr

    from graphwise.engine.structured import RequestGrammar

    rng = random.Random(seed)
    one = xgr.allocate_token_bitmask(1, so.vocab_size)
    out = []
    while len(out) < count:
        m = xgr.GrammarMatcher(compiled, override_stop_tokens=so.stop_ids)
        if kind == "json_text":
            ids = tokenizer.encode(_document(rng), add_special_tokens=False)
            cut = rng.randint(1, len(ids) - 1)  # anywhere in the text, before its end
            if not all(m.accept_token(t) for t in ids[:cut]):
                raise RuntimeError("the generated document does not fit SCHEMA's grammar")
        else:  # uniform over the allowed tokens, 1 to 160 of them (the H200 run's outputs)
            for _ in range(rng.randint(1, 160)):
                m.fill_next_token_bitmask(one)
                bits = np.unpackbits(one.numpy().view(np.uint8), bitorder="little")
                allowed = np.flatnonzero(bits[: so.vocab_size])
                if not m.accept_token(int(allowed[rng.randrange(len(allowed))])):
                    raise RuntimeError("xgrammar refused a token its own mask allowed")
        if m.is_terminated():
            continue
        g = RequestGrammar(None, ("json", ""), so.stop_ids)  # type: ignore[arg-type]
        g.matcher = m
        out.append(g)
    return out


def _previous_fill(so, grammars: list, threads: int):
    """The fill as it was at the H200 measurement (2ab044f): torch.full, then xgrammar's
    BatchGrammarMatcher with its own threads (started and joined on every call)."""
    import torch
    import xgrammar as xgr

    mask = torch.full((len(grammars), so.words), -1, dtype=torch.int32)
    live = [(i, g.matcher) for i, g in enumerate(grammars) if not g.matcher.is_terminated()]
    if len(live) == 1:
        live[0][1].fill_next_token_bitmask(mask, live[0][0])
    else:
        key = ("previous", threads)
        if key not in _BATCH:
            _BATCH[key] = xgr.BatchGrammarMatcher(max_threads=threads)
        _BATCH[key].batch_fill_next_token_bitmask([m for _, m in live], mask, [i for i, _ in live])
    arr = mask.numpy()
    empty = ~arr.any(axis=1)
    if empty.any():
        arr[empty] = -1
    return arr


_BATCH: dict = {}


def _time(fn, pool: list, n: int, repeats: int) -> dict:
    """Milliseconds per fill of n rows, the rows changing between calls."""
    times = []
    for r in range(repeats + 3):
        at = (r * n) % (len(pool) - n + 1)
        rows = pool[at : at + n]
        t = time.perf_counter()
        fn(rows)
        if r >= 3:  # warm-up: first calls start threads and allocate
            times.append(time.perf_counter() - t)
    times.sort()
    return {"median_ms": 1e3 * statistics.median(times),
            "p10_ms": 1e3 * times[len(times) // 10], "p90_ms": 1e3 * times[(9 * len(times)) // 10]}  # fmt: skip


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor()


def fill_only(args: argparse.Namespace) -> dict:
    import importlib.metadata as md

    import torch
    from transformers import AutoTokenizer

    from graphwise.engine.mask_fill import available_cpus, default_fill_threads
    from graphwise.engine.structured import StructuredOutputs
    from graphwise.insight.system import environment

    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from graphwise.models.default import default_model_path

        gguf = default_model_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    stop = frozenset({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else ())
    rows_list = [int(x) for x in args.rows.split(",")]
    auto = default_fill_threads()
    threads_list = sorted({auto if t == "auto" else int(t) for t in args.threads.split(",")})
    load0 = os.getloadavg()
    results = []
    for vocab in [int(v) for v in args.vocab_sizes.split(",") if v] or [len(tokenizer)]:
        so = StructuredOutputs(tokenizer, vocab, stop)
        t = time.perf_counter()
        params = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
        compiled = so.request_grammar(params).future.result()
        compile_s = time.perf_counter() - t
        for kind in ("json_text", "random_tokens"):
            pool = _rows(so, compiled, tokenizer, kind, max(rows_list) * 4, seed=vocab)
            serial_per_row = None
            for n in rows_list:
                for threads in threads_list:
                    so.filler.shutdown()
                    so.filler.threads = threads
                    ours = _time(so.fill, pool, n, args.fill_repeats)
                    before = _time(lambda g, t=threads, s=so: _previous_fill(s, g, t), pool, n,
                                   args.fill_repeats)  # fmt: skip
                    r = {"vocab_size": vocab, "prefix": kind, "rows": n, "threads": threads,
                         "chunks": so.filler.num_chunks(n), "fill": ours,
                         "previous_fill": before}  # fmt: skip
                    if threads == 1 and n == max(rows_list):
                        serial_per_row = ours["median_ms"] / n
                    results.append(r)
                    print(json.dumps(r), flush=True)
            for r in results:
                if r["vocab_size"] == vocab and r["prefix"] == kind:
                    r["serial_ms_per_row"] = serial_per_row
        so.shutdown()
        results.append({"vocab_size": vocab, "compile_s_first": compile_s})
    # Why the previous fill was slow on a busy host: its torch.full (and the runner's pinned
    # copy of the mask) run through torch's intra-op OpenMP pool once a tensor has more than
    # 32k elements; when the pool's threads have gone to sleep (here: 0.5 ms of other work in
    # between, about a fill) and no core is free, waking one takes scheduler ticks.
    hazard = {}
    threads0 = torch.get_num_threads()
    words = so.words
    for n_threads in sorted({threads0, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        times = []
        for _ in range(args.fill_repeats):
            until = time.perf_counter() + 5e-4
            while time.perf_counter() < until:  # the engine thread busy, as during a fill
                pass
            t = time.perf_counter()
            torch.full((64, words), -1, dtype=torch.int32)
            times.append(time.perf_counter() - t)
        times.sort()
        hazard[f"torch.full[64,{words}] after 0.5 ms of other work, intra_op_threads="
               f"{n_threads}"] = {"median_ms": 1e3 * statistics.median(times),
                                  "p90_ms": 1e3 * times[(9 * len(times)) // 10]}  # fmt: skip
    torch.set_num_threads(threads0)
    return {
        "what": "StructuredOutputs.fill alone (the engine's per-step mask fill), SCHEMA of "
        "benchmarks/structured_bench.py, matchers at valid mid-generation prefixes",
        "device": f"CPU: {_cpu_model()} ({available_cpus()} CPUs available, os.cpu_count() "
        f"{os.cpu_count()})",
        "load_average_before_after": [load0, os.getloadavg()],
        "auto_threads": auto,
        "tokenizer": args.tokenizer or "the embedded default's (SmolLM2, 49,152 ids)",
        "versions": {
            "xgrammar": md.version("xgrammar"),
            "torch": torch.__version__,
            "numpy": md.version("numpy"),
            "python": platform.python_version(),
            "torch_intra_op_threads": torch.get_num_threads(),
        },
        "environment": environment("cpu"),
        "results": results,
        "torch_intra_op_hazard": hazard,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--preset", default=None)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--fill-only",
        action="store_true",
        help="time the per-step mask fill alone on this CPU (no model)",
    )
    ap.add_argument("--rows", default="1,8,64", help="--fill-only: rows per fill")
    ap.add_argument("--threads", default="1,2,auto", help="--fill-only: fill threads")
    ap.add_argument(
        "--vocab-sizes",
        default="",
        help="--fill-only: mask widths (e.g. 49152,152064: the qwen2.5-7b "
        "preset's vocabulary over SmolLM2's tokenizer); default the tokenizer's",
    )
    ap.add_argument("--fill-repeats", type=int, default=200)
    ap.add_argument(
        "--fill-threads",
        type=int,
        default=None,
        help="structured_outputs_fill_threads of the engine (default: auto)",
    )
    args = ap.parse_args()
    if args.fill_only:
        summary = fill_only(args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=1)
        return
    llm = LLM(model=args.model, preset=args.preset, tokenizer=args.tokenizer,
              max_num_seqs=args.batch, max_model_len=args.max_model_len,
              structured_outputs_fill_threads=args.fill_threads)  # fmt: skip
    engine = llm.llm_engine
    t = time.perf_counter()
    engine.structured.request_grammar(StructuredOutputsParams(json=SCHEMA)).future.result()
    first_compile = time.perf_counter() - t  # tokenizer info + the first compile
    results = []
    for _ in range(args.repeats):  # alternate, so drift hits both alike
        for constrained in (False, True):
            r = run(llm, args.batch, args.prompt_len, args.output_len, constrained)
            print(json.dumps(r), flush=True)
            results.append(r)
    med = {c: statistics.median(r["step_ms_median"] for r in results if r["constrained"] == c)
           for c in (False, True)}  # fmt: skip
    summary = {
        "model": args.model or args.preset,
        "batch": args.batch,
        "async_scheduling": engine.async_scheduling,
        "graphs": engine.get_stats().steps_graph > 0,
        "fill_threads": engine.structured.filler.threads,
        "plain_step_ms": med[False],
        "json_step_ms": med[True],
        "ratio": med[True] / med[False],
        "grammar_first_compile_s": first_compile,
        "grammar_compile_s": engine.structured.compile_s,
        "environment": environment(engine.device),
        "runs": results,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
