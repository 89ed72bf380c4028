"""The measured CUDA-graph decision under tensor parallelism, on two GPUs (scripts/gpu_run.sh tp2).

Builds a TP=2 engine with cuda_graph="auto" (every rank times the same steps and adopts the
slowest rank's numbers), prints the decision and the memory plan, then checks that greedy
tokens with the kept graphs equal eager ones and that decode really replayed graphs. Writes a
JSON result.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from graphwise import LLM, SamplingParams
from graphwise.insight.system import environment
from graphwise.runner.graph_decision import format_decision_table


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    llm = LLM(
        preset=args.preset,
        load_format="dummy",
        tensor_parallel_size=2,
        max_num_seqs=64,
        max_model_len=1024,
        gpu_memory_utilization=0.8,
    )
    startup_s = time.perf_counter() - started
    engine = llm.llm_engine
    plan = engine.graph_plan
    print(format_decision_table(plan.decisions, plan.min_speedup) if plan else "no graph plan")
    print(engine.memory_plan.summary_line())
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(24)]} for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    before = engine.get_stats()
    graph = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    after = engine.get_stats()
    engine.set_cuda_graphs_enabled(False)
    eager = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    engine.set_cuda_graphs_enabled(True)
    replays = after.steps_graph - before.steps_graph
    same = graph == eager
    print(f"graph replays {replays}; greedy tokens graph == eager: {same}")
    result = {
        "check": "auto CUDA-graph decision under TP=2",
        "preset": args.preset,
        "environment": environment(engine.device),
        "startup_s": startup_s,
        "graph_plan": plan.as_dict() if plan else None,
        "memory_plan": engine.memory_plan.as_dict(),
        "capture": vars(engine.capture_stats) if engine.capture_stats else None,
        "graph_replays_in_generate": replays,
        "greedy_graph_equals_eager": same,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.output).write_text(json.dumps(result, indent=2, default=str) + "\n")
    llm.shutdown()
    return 0 if same and (plan is None or not plan.kept or replays > 0) else 1


if __name__ == "__main__":
    raise SystemExit(main())
