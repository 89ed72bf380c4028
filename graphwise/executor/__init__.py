"""Executors: how the engine reaches the model runner(s), in one process or across many."""

from graphwise.executor.base import Executor, create_executor

__all__ = ["Executor", "create_executor"]
