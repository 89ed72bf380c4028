"""`bench offline` pieces that need no model; the run itself is in test_e2e.py (slow)."""

from __future__ import annotations

import argparse

import pytest

from graphwise.bench import offline
from graphwise.config import EngineConfig


def test_parse_len_range():
    assert offline.parse_len_range("100-1024") == (100, 1024)
    assert offline.parse_len_range("8,16") == (8, 16)
    assert offline.parse_len_range("32") == (32, 32)
    for bad in ("0-5", "9-3", "a-b", "1-2-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            offline.parse_len_range(bad)


def test_defaults_are_the_fixed_workload():
    parser = argparse.ArgumentParser()
    offline.add_arguments(parser)
    args = parser.parse_args([])
    assert args.num_prompts == 256
    assert args.input_len_range == (100, 1024) and args.output_len_range == (100, 1024)
    assert args.seed == 0


def test_engine_kwargs_only_non_defaults():
    config = EngineConfig(preset="qwen2.5-7b", load_format="dummy", cuda_graph="off")
    assert offline.engine_kwargs(config) == {
        "preset": "qwen2.5-7b",
        "load_format": "dummy",
        "cuda_graph": "off",
    }
    assert offline.engine_kwargs(EngineConfig()) == {}


def test_environment_reports_device_and_versions():
    device, versions = offline.environment()
    assert device["type"] in ("cpu", "cuda") and device["name"]
    assert versions["torch"] and versions["python"]
