"""Structured output's cost on the decode step (issue 20): batch B, every row under a JSON
schema vs no row constrained, same engine, same prompt lengths; async scheduling and graphs as
configured. Reports the median per-step wall time of full-batch decode steps (the engine's
step log), the host time spent filling masks, and the grammar compile times.

    python benchmarks/structured_bench.py --preset qwen2.5-7b --tokenizer DIR --batch 64
"""

from __future__ import annotations

import argparse
import json
import statistics
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
        "wall_s": wall,
        "output_tokens_min_mean": [min(lengths), statistics.fmean(lengths)],
        "finish_reasons": sorted({o.outputs[0].finish_reason for o in outs}),
        "outputs_the_grammar_accepts": valid,
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
    args = ap.parse_args()
    llm = LLM(model=args.model, preset=args.preset, tokenizer=args.tokenizer,
              max_num_seqs=args.batch, max_model_len=args.max_model_len)  # fmt: skip
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
