"""Benchmarking tools: `graphwise bench serve | offline | sweep` (and `latency`).

- `datasets`: ShareGPT and random workloads, tokenizer lookup (local files only).
- `metrics`: arrival times and the vLLM-named serving metrics.
- `serve`: the streaming OpenAI-compatible client and the `bench serve` command.
- `offline`: in-process throughput through `graphwise.LLM`.
- `sweep`: start servers, run `bench serve` at several rates, write the table and plots.
- `plots`: the sweep's PNG figures (matplotlib, Agg).
"""
