"""N-gram speculative decoding vs plain decoding: ms per output token, acceptance, verify cost.

    python scripts/spec_bench.py --preset qwen2.5-7b --batch-sizes 1,8 --output spec.json
    python scripts/spec_bench.py --model /path/to/weights ...   (real weights: real acceptance)

Workload (repetitive, "the prompt holds most of the answer"): each prompt is a block of text
repeated `--repeats` times — the repo's own README tokenized when the model has a tokenizer,
random ids otherwise — and every request decodes greedily for `--output-len` tokens (ignore_eos).
Rows: {method, batch_size, ms_per_output_token, acceptance_rate, mean_accepted_tokens, weights,
verify_step_ms, decode_step_ms}. `weights` says "dummy" for presets: dummy weights do not copy
text, so their acceptance (and hence the end-to-end speed-up) says nothing about a real model;
the verify cost (a step of k + 1 tokens per row against a plain decode step) does.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphwise.config import EngineConfig  # noqa: E402
from graphwise.core.tracing import StepRecord  # noqa: E402
from graphwise.engine.engine import LLMEngine  # noqa: E402
from graphwise.sampling_params import SamplingParams  # noqa: E402


class _Steps:
    def __init__(self) -> None:
        self.records: list[StepRecord] = []

    def add(self, record: StepRecord) -> None:
        self.records.append(record)


def _prompt(engine: LLMEngine, length: int, repeats: int, seed: int) -> list[int]:
    block_len = max(1, length // repeats)
    if engine.tokenizer is not None:
        text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
        ids = engine.tokenizer.encode(text)
        start = random.Random(seed).randrange(max(1, len(ids) - block_len))
        block = ids[start : start + block_len]
    else:
        rng = random.Random(seed)
        block = [rng.randrange(engine.model_config.vocab_size) for _ in range(block_len)]
    return block * repeats


def _run(engine: LLMEngine, batch: int, args: argparse.Namespace) -> dict:
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    prompts = [_prompt(engine, args.input_len, args.repeats, seed=i) for i in range(batch)]
    before = engine.get_stats()
    engine.reset_prefix_cache()
    steps = _Steps()
    engine.step_log = steps
    for p in prompts:
        engine.add_request(None, params, prompt_token_ids=p)
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    elapsed = time.perf_counter() - t
    engine.step_log = None
    after = engine.get_stats()
    drafts = after.spec_decode_num_drafts - before.spec_decode_num_drafts
    proposed = after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens
    accepted = after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens
    k = args.num_speculative_tokens
    decode = [r.total_s for r in steps.records if r.seqs == batch and r.tokens == batch]
    verify = [r.total_s for r in steps.records if r.seqs == batch and r.tokens == batch * (k + 1)]
    return {
        "batch_size": batch,
        # every request decodes output_len tokens side by side: the latency per output token
        "ms_per_output_token": 1000 * elapsed / args.output_len,
        "acceptance_rate": accepted / proposed if proposed else None,
        "mean_accepted_tokens": 1 + accepted / drafts if drafts else None,
        "decode_step_ms": 1000 * statistics.median(decode) if decode else None,
        "verify_step_ms": 1000 * statistics.median(verify) if verify else None,
        "num_verify_steps_full": len(verify),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--prompt-lookup-max", type=int, default=4)
    parser.add_argument("--prompt-lookup-min", type=int, default=2)
    parser.add_argument("--methods", default="none,ngram")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--kv-cache-memory", type=int, default=4 << 30)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    spec = {
        "method": "ngram",
        "num_speculative_tokens": args.num_speculative_tokens,
        "prompt_lookup_max": args.prompt_lookup_max,
        "prompt_lookup_min": args.prompt_lookup_min,
    }
    rows = []
    for method in args.methods.split(","):
        config = EngineConfig(
            model=args.model,
            preset=args.preset,
            max_num_seqs=max(batches),
            max_model_len=args.input_len + args.output_len + 64,
            enforce_eager=args.enforce_eager,
            kv_cache_memory=args.kv_cache_memory,  # two engines in turn: a small, fixed pool
            speculative_config=spec if method == "ngram" else None,
        )
        engine = LLMEngine(config)
        weights = "dummy" if args.preset or config.load_format == "dummy" else "checkpoint"
        _run(engine, 1, argparse.Namespace(**{**vars(args), "output_len": 8}))  # warm-up
        for batch in batches:
            row = {"method": method, "weights": weights, **_run(engine, batch, args)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        engine.shutdown()
        del engine
        gc.collect()  # the next engine's weights and KV pool need this one's memory back
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.output:
        Path(args.output).write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
