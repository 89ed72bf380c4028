"""Tensor, pipeline and data parallelism (see docs/parallel.md).

- parallel_state: ranks, process groups, the collectives layers call
- launcher: start the ranks (spawned on one machine, or joined through torchrun's variables)
- worker: a spawned rank's process
- executor: ParallelModelRunner, the runner of every rank (rank 0's is LLMEngine.runner)
- dp: DataParallelEngine, several engine replicas behind one front; create_engine
"""
