"""Speculative decoding (n-gram, draft model) vs plain decoding: ms per output token,
acceptance, verify cost.

    python scripts/spec_bench.py --preset qwen2.5-7b --batch-sizes 1,8 --output spec.json
    python scripts/spec_bench.py --model /path/to/weights ...   (real weights: real acceptance)
    python scripts/spec_bench.py --methods none,ngram,draft_model,draft_model:8 ...

Methods: `none` (plain), `ngram`, `draft_model` (the draft at `--draft-model`, by default the
target's own checkpoint: the target drafting for itself, an upper bound on acceptance that
costs a full target forward per draft) and `draft_model:N` (that checkpoint cut to its first N
layers with its final norm and LM head: an early-exit self-draft, LayerSkip-style but on a
model never trained for it).

Workload (repetitive, "the prompt holds most of the answer"): each prompt is a block of text
repeated `--repeats` times — the repo's own README tokenized when the model has a tokenizer,
random ids otherwise — and every request decodes greedily for `--output-len` tokens (ignore_eos).
Rows: {method, batch_size, ms_per_output_token, acceptance_rate, mean_accepted_tokens, weights,
verify_step_ms, decode_step_ms, steps_graph, steps_eager}. `weights` says "dummy" for presets: dummy weights do not copy
text, so their acceptance (and hence the end-to-end speed-up) says nothing about a real model;
the verify cost (a step of k + 1 tokens per row against a plain decode step) does.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphwise.config import EngineConfig  # noqa: E402
from graphwise.core.tracing import NULL_TRACER, StepRecord  # noqa: E402
from graphwise.engine.engine import LLMEngine  # noqa: E402
from graphwise.sampling_params import SamplingParams  # noqa: E402


class _Steps:
    def __init__(self) -> None:
        self.records: list[StepRecord] = []

    def add(self, record: StepRecord) -> None:
        self.records.append(record)


class _SpanClock:
    """Host time per span name (the runner's "draft" and "forward" phases). Exact on the CPU,
    where every op runs when it is called; on a GPU it is the time to enqueue."""

    def __init__(self) -> None:
        self.open: list[tuple[str, float]] = []
        self.spans: dict[str, list[float]] = {}

    def push(self, name: str) -> None:
        self.open.append((name, time.perf_counter()))

    def pop(self) -> None:
        name, start = self.open.pop()
        self.spans.setdefault(name, []).append(time.perf_counter() - start)


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
    per_pos_before = list(engine.scheduler.spec_stats.accepted_per_pos)
    engine.reset_prefix_cache()
    steps = _Steps()
    engine.step_log = steps
    clock = _SpanClock()
    engine.set_tracer(clock)
    for p in prompts:
        engine.add_request(None, params, prompt_token_ids=p)
    started: set[str] = set()
    t = time.perf_counter()
    first = None  # when every request has its first token (the prefill is done)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.outputs and out.outputs[0].token_ids:
                started.add(out.request_id)
        if first is None and len(started) == batch:
            first = time.perf_counter()
    end = time.perf_counter()
    elapsed = end - t
    engine.step_log = None
    engine.set_tracer(NULL_TRACER)
    after = engine.get_stats()
    drafts = after.spec_decode_num_drafts - before.spec_decode_num_drafts
    proposed = after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens
    accepted = after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens
    per_pos = [
        (a - b) / drafts if drafts else None
        for a, b in zip(engine.scheduler.spec_stats.accepted_per_pos, per_pos_before, strict=True)
    ]
    k = args.num_speculative_tokens
    decode = [r.total_s for r in steps.records if r.seqs == batch and r.tokens == batch]
    verify = [r.total_s for r in steps.records if r.seqs == batch and r.tokens == batch * (k + 1)]
    draft = clock.spans.get("draft", [])
    assert first is not None
    return {
        "batch_size": batch,
        # every request decodes output_len tokens side by side: the latency per output token
        "ms_per_output_token": 1000 * elapsed / args.output_len,
        # the same after the prefill (time to the first token left out)
        "decode_ms_per_output_token": 1000 * (end - first) / max(1, args.output_len - 1),
        "acceptance_rate": accepted / proposed if proposed else None,
        "mean_accepted_tokens": 1 + accepted / drafts if drafts else None,
        "acceptance_per_position": per_pos if drafts else None,
        "decode_step_ms": 1000 * statistics.median(decode) if decode else None,
        "verify_step_ms": 1000 * statistics.median(verify) if verify else None,
        # a verify step's draft-model part: mirror + catch-up + k draft decode steps
        "draft_ms_per_step": 1000 * statistics.median(draft) if draft else None,
        "num_verify_steps_full": len(verify),
        # steps whose forward replayed a CUDA graph / ran eagerly (verify steps replay the
        # decode graph of their token count when one fits: runner/inputs.py as_decode_rows)
        "steps_graph": after.steps_graph - before.steps_graph,
        "steps_eager": after.steps_eager - before.steps_eager,
    }


def _median_trial(trials: list[dict]) -> dict:
    """The trial with the median decode ms per output token, with every trial's value."""
    ordered = sorted(trials, key=lambda r: r["decode_ms_per_output_token"])
    row = dict(ordered[len(ordered) // 2])
    row["decode_ms_per_output_token_trials"] = [r["decode_ms_per_output_token"] for r in trials]
    return row


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
    parser.add_argument("--draft-model", default=None, help="default: the target's checkpoint")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--trials", type=int, default=1, help="runs per row (median kept)")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="keep every method's engine and run them in turn each trial (a shared CPU)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--kv-cache-memory", type=int, default=4 << 30)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    methods = args.methods.split(",")
    rows = []
    if args.interleave:
        # Every engine at once; each trial runs the methods in turn, so that a shared
        # machine's load falls on all of them alike.
        engines = {m: _engine(m, batches, args) for m in methods}
        for batch in batches:
            trials: dict[str, list[dict]] = {m: [] for m in methods}
            for _ in range(args.trials):
                for m in methods:
                    trials[m].append(_run(engines[m][0], batch, args))
            for m in methods:
                rows.append(_row(m, engines[m][1], trials[m], args))
        for engine, _ in engines.values():
            engine.shutdown()
    else:
        for m in methods:
            engine, weights = _engine(m, batches, args)
            for batch in batches:
                trials = [_run(engine, batch, args) for _ in range(args.trials)]
                rows.append(_row(m, weights, trials, args))
            engine.shutdown()
            del engine
            gc.collect()  # the next engine's weights and KV pool need this one's memory back
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if args.output:
        result = {"provenance": _provenance(), "config": vars(args), "rows": rows}
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _engine(method: str, batches: list[int], args: argparse.Namespace) -> tuple[LLMEngine, str]:
    spec, _ = _spec_config(method, args)
    config = EngineConfig(
        model=args.model,
        preset=args.preset,
        max_num_seqs=max(batches),
        max_model_len=args.input_len + args.output_len + 64,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
        kv_cache_memory=args.kv_cache_memory,  # several engines: a small, fixed pool
        speculative_config=spec,
    )
    engine = LLMEngine(config)
    weights = "dummy" if args.preset or config.load_format == "dummy" else "checkpoint"
    _run(engine, 1, argparse.Namespace(**{**vars(args), "output_len": 8}))  # warm-up
    return engine, weights


def _row(method: str, weights: str, trials: list[dict], args: argparse.Namespace) -> dict:
    row = {
        "method": method.split(":")[0],
        "draft": _spec_config(method, args)[1],
        "weights": weights,
        **_median_trial(trials),
    }
    print(json.dumps(row), flush=True)
    return row


def _spec_config(method: str, args: argparse.Namespace) -> tuple[dict | None, str | None]:
    """The speculative_config of a `--methods` entry and a label for its draft."""
    k = args.num_speculative_tokens
    if method == "none":
        return None, None
    if method == "ngram":
        spec = {
            "method": "ngram",
            "num_speculative_tokens": k,
            "prompt_lookup_max": args.prompt_lookup_max,
            "prompt_lookup_min": args.prompt_lookup_min,
        }
        return spec, "prompt lookup"
    name, _, layers = method.partition(":")
    if name != "draft_model":
        raise SystemExit(f"unknown method {method!r}: none, ngram, draft_model, draft_model:N")
    path = args.draft_model or args.model
    if path is None:
        from graphwise.models.default import default_model_path

        path = str(default_model_path())
    spec = {"method": "draft_model", "model": path, "num_speculative_tokens": k}
    own = args.draft_model is None or args.draft_model == args.model
    if layers:
        spec["num_layers"] = int(layers)
        label = f"early exit: the first {layers} layers of {'the target' if own else path}"
    else:
        label = "the target itself (upper bound on acceptance)" if own else path
    return spec, label


def _provenance() -> dict:
    """Where the numbers come from: the device, the versions, the commit."""
    import transformers

    root = Path(__file__).resolve().parents[1]

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", *cmd], cwd=root, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        device = f"CPU: {cpu}, {torch.get_num_threads()} torch threads"
    return {
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}",
        "commit": git("rev-parse", "HEAD") + (" (dirty)" if git("status", "--porcelain") else ""),
    }


if __name__ == "__main__":
    raise SystemExit(main())
