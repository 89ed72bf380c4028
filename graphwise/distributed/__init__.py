"""Tensor and pipeline parallelism plumbing (see docs/parallel.md).

- parallel_state: ranks, process groups, the collectives layers call, start-up agreement
- launcher: start and watch the ranks' processes (spawned on one machine, or torchrun's)

The executor that drives the ranks is graphwise/executor/; the data-parallel front over several
engines is graphwise/engine/data_parallel.py.
"""
