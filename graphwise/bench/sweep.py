"""`graphwise bench sweep CONFIG.yaml`: start servers, run `bench serve` at each rate, tabulate.

For each setup the sweep starts `python -m graphwise.cli serve ... --host 127.0.0.1 --port P` on
a free loopback port, waits for `GET /health` to answer 200 (bounded; if the server exits or
times out, the error shows its log's tail), runs `bench serve` at every request rate against it,
and stops it (SIGTERM to its process group, SIGKILL after a grace period) - also on errors,
Ctrl-C and SIGTERM. Then it writes, under the output directory:

- `<setup>-qps<rate>.json`: each run's `bench serve` result; `<setup>-server.log`: server output
- `sweep.md`, `sweep.csv`: Model | Parallel Config | cuda graph | qps | throughput (output tok/s)
  | ttft (mean ms) | tpot (median ms) | ttft (p99 ms) | itl (p99 ms) | completed
- `sweep.json`: the rows and the settings; `throughput_vs_qps.png`, `ttft_vs_qps.png`

YAML schema (unknown keys are errors; only `setups` is required):

    name: h100-single            # title of the table and plots (default: the file's stem)
    output_dir: results/x        # default benchmarks/results/<file stem>; --output-dir wins
    server:                      # applies to every setup
      startup_timeout_s: 600     # how long to wait for /health (default 600)
      shutdown_grace_s: 20       # SIGTERM -> SIGKILL delay (default 20)
      args: ["--max-num-seqs", "128"]   # extra `graphwise serve` flags
      env: {CUDA_VISIBLE_DEVICES: "0"}  # extra environment variables
    bench:                       # `graphwise bench serve` flags, snake_case, for every run
      request_rates: [1, 2, 4, 8]       # required here or per setup; numbers or inf
      dataset: sharegpt          # sharegpt | random
      num_prompts: 200
      seed: 0
      # also: sharegpt_output_len, random_input_len, random_output_len, random_range_ratio,
      # burstiness, max_concurrency, endpoint, model, tokenizer, dataset_path, temperature,
      # ignore_eos, request_timeout, api_key, save_detailed
    setups:
      - name: qwen7b-graph-on    # required, unique: file names and plot legend
        label: Qwen2.5-7B        # the Model column (default: preset, model file name, or
                                 # SmolLM2-135M for the embedded default)
        preset: qwen2.5-7b       # or model: PATH (HF dir or .gguf); neither = embedded default
        load_format: dummy       # default: dummy with a preset
        cuda_graph: "on"         # on | off | auto (quote it: bare on/off are YAML booleans,
                                 # which are accepted too)
        enforce_eager: false
        async_scheduling: true   # false: one step at a time (shown in the cuda graph column)
        tensor_parallel_size: 1  # also pipeline_parallel_size, data_parallel_size
        max_num_seqs: 256        # also num_layers, max_model_len, dtype
        args: []                 # extra server flags for this setup
        env: {}                  # extra environment for this setup
        request_rates: [1, 2]    # overrides bench.request_rates
        bench: {num_prompts: 50} # overrides bench keys for this setup

    graphwise bench sweep benchmarks/sweep-h100-single.yaml --output-dir out/
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from graphwise.bench import serve as bench_serve

logger = logging.getLogger(__name__)

DEFAULT_STARTUP_TIMEOUT_S = 600.0
DEFAULT_SHUTDOWN_GRACE_S = 20.0
LOG_TAIL_LINES = 40

TOP_KEYS = {"name", "output_dir", "server", "bench", "setups"}
SERVER_KEYS = {"startup_timeout_s", "shutdown_grace_s", "args", "env"}
SETUP_KEYS = {
    "name",
    "label",
    "model",
    "preset",
    "load_format",
    "cuda_graph",
    "enforce_eager",
    "async_scheduling",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "data_parallel_size",
    "max_num_seqs",
    "num_layers",
    "max_model_len",
    "dtype",
    "args",
    "env",
    "request_rates",
    "bench",
}
# Setup keys that become `graphwise serve --flag VALUE` when set.
SERVER_VALUE_FLAGS = (
    "model",
    "preset",
    "load_format",
    "cuda_graph",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "data_parallel_size",
    "max_num_seqs",
    "num_layers",
    "max_model_len",
    "dtype",
)
# `bench serve` flags the sweep sets itself.
BENCH_RESERVED = {"base_url", "save_result", "request_rate", "disable_tqdm"}
BOOL_BENCH_KEYS = {"ignore_eos", "save_detailed"}

TABLE_COLUMNS = (
    "Model",
    "Parallel Config",
    "cuda graph",
    "qps",
    "throughput (output tok/s)",
    "ttft (mean ms)",
    "tpot (median ms)",
    "ttft (p99 ms)",
    "itl (p99 ms)",
    "completed",
)


# --------------------------------------------------------------------------- the config


@dataclass
class Setup:
    name: str
    label: str
    server_args: list[str]
    env: dict[str, str]
    request_rates: list[float]
    bench_argv: list[str]
    cuda_graph: str
    parallel: str
    startup_timeout_s: float
    shutdown_grace_s: float
    async_scheduling: str = "on"  # on | off, as the server will run it


@dataclass
class SweepConfig:
    name: str
    output_dir: Path | None
    setups: list[Setup] = field(default_factory=list)


def _check_keys(section: str, value: Any, allowed: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{section} must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(
            f"unknown key(s) in {section}: {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )
    return value


def _rate(value: Any, where: str) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: request rate {value!r} is not a number or inf") from None
    if math.isnan(rate) or rate <= 0:
        raise ValueError(f"{where}: request rate must be positive or inf, got {value!r}")
    return rate


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of strings")
    return [str(v) for v in value]


def _str_dict(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping")
    return {str(k): str(v) for k, v in value.items()}


def _graph_mode(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value is True:
        return "on"
    if value is False:
        return "off"
    mode = str(value).lower()
    if mode not in ("on", "off", "auto"):
        raise ValueError(f"{where}: cuda_graph must be on, off or auto, got {value!r}")
    return mode


def bench_argv_from_mapping(bench: dict[str, Any], where: str) -> list[str]:
    """snake_case `bench serve` settings -> its command-line flags (validated by its parser)."""
    reserved = sorted(BENCH_RESERVED & set(bench))
    if reserved:
        raise ValueError(f"{where}: the sweep sets {', '.join(reserved)} itself")
    argv: list[str] = []
    for key, value in bench.items():
        flag = "--" + key.replace("_", "-")
        if key in BOOL_BENCH_KEYS:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {key} must be true or false")
            if key == "ignore_eos":
                argv.append(flag if value else "--no-ignore-eos")
            elif value:
                argv.append(flag)
        elif value is not None:
            argv += [flag, str(value)]
    try:
        bench_serve.parse_args(argv)
    except SystemExit:
        raise ValueError(
            f"{where}: invalid bench settings {argv} (see the message above)"
        ) from None
    return argv


def _label(setup: dict[str, Any]) -> str:
    if setup.get("label"):
        return str(setup["label"])
    if setup.get("preset"):
        return str(setup["preset"])
    if setup.get("model"):
        return Path(str(setup["model"])).name
    return "SmolLM2-135M (embedded)"


def _flag_value(args: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the last `--flag V` / `--flag=V` among `names` in a server command line."""
    value = None
    for i, arg in enumerate(args):
        name, eq, inline = arg.partition("=")
        if name in names:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def parallel_of(server_args: Sequence[str]) -> str:
    """'TP=2' or 'TP=2, PP=2, DP=2' (PP and DP shown only when not 1), read from the flags."""
    tp = _flag_value(server_args, ("--tensor-parallel-size", "--tp")) or "1"
    pp = _flag_value(server_args, ("--pipeline-parallel-size", "--pp")) or "1"
    dp = _flag_value(server_args, ("--data-parallel-size", "--dp")) or "1"
    parts = [f"TP={tp}"]
    if pp != "1":
        parts.append(f"PP={pp}")
    if dp != "1":
        parts.append(f"DP={dp}")
    return ", ".join(parts)


def async_mode_of(server_args: Sequence[str]) -> str:
    """on | off: async scheduling as the server will run it (the last flag wins, as argparse)."""
    mode = "on"
    for arg in server_args:
        if arg == "--async-scheduling":
            mode = "on"
        elif arg in ("--no-async-scheduling", "--disable-overlap-schedule"):
            mode = "off"
    return mode


def graph_mode_of(server_args: Sequence[str]) -> str:
    """on | off | auto as the server will run it (--enforce-eager wins, as in EngineConfig)."""
    if "--enforce-eager" in server_args:
        return "off"
    return _flag_value(server_args, ("--cuda-graph",)) or "auto"


def parse_config(data: Any, default_name: str = "sweep") -> SweepConfig:
    """Validate a loaded YAML document and expand it into setups (no process is started)."""
    top = _check_keys("the sweep file", data, TOP_KEYS)
    server = _check_keys("server", top.get("server"), SERVER_KEYS)
    bench = dict(top.get("bench") or {})
    if not isinstance(top.get("bench") or {}, dict):
        raise ValueError("bench must be a mapping")
    bench_keys = _bench_keys()
    _check_keys("bench", bench, bench_keys)
    default_rates = bench.pop("request_rates", None)
    raw_setups = top.get("setups")
    if not isinstance(raw_setups, list) or not raw_setups:
        raise ValueError("setups must be a non-empty list")
    config = SweepConfig(
        name=str(top.get("name") or default_name),
        output_dir=Path(top["output_dir"]) if top.get("output_dir") else None,
    )
    seen: set[str] = set()
    for i, raw in enumerate(raw_setups):
        where = f"setups[{i}]"
        s = _check_keys(where, raw, SETUP_KEYS)
        name = str(s.get("name") or "")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError(f"{where}: name is required (letters, digits, '.', '_', '-')")
        if name in seen:
            raise ValueError(f"{where}: duplicate setup name {name!r}")
        seen.add(name)
        where = f"setup {name!r}"
        if s.get("model") and s.get("preset"):
            raise ValueError(f"{where}: give model or preset, not both")
        s = dict(s)
        s["cuda_graph"] = _graph_mode(s.get("cuda_graph"), where)
        if s.get("preset") and not s.get("load_format"):
            s["load_format"] = "dummy"
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            value = s.get(key, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {key} must be a positive integer")
        server_args: list[str] = []
        for key in SERVER_VALUE_FLAGS:
            if s.get(key) is not None:
                server_args += ["--" + key.replace("_", "-"), str(s[key])]
        if s.get("enforce_eager"):
            server_args.append("--enforce-eager")
        if s.get("async_scheduling") is not None:
            if not isinstance(s["async_scheduling"], bool):
                raise ValueError(f"{where}: async_scheduling must be true or false")
            server_args.append(
                "--async-scheduling" if s["async_scheduling"] else "--no-async-scheduling"
            )
        server_args += _str_list(server.get("args"), "server.args")
        server_args += _str_list(s.get("args"), f"{where}: args")
        env = _str_dict(server.get("env"), "server.env") | _str_dict(s.get("env"), f"{where}: env")
        rates_raw = s.get("request_rates", default_rates)
        if rates_raw is None:
            raise ValueError(f"{where}: no request_rates (set bench.request_rates or per setup)")
        if not isinstance(rates_raw, list):
            rates_raw = [rates_raw]
        if not rates_raw:
            raise ValueError(f"{where}: request_rates is empty")
        rates = [_rate(r, where) for r in rates_raw]
        overrides = _check_keys(f"{where}: bench", s.get("bench"), bench_keys)
        merged_bench = bench | dict(overrides)
        merged_bench.pop("request_rates", None)
        config.setups.append(
            Setup(
                name=name,
                label=_label(s),
                server_args=server_args,
                env=env,
                request_rates=rates,
                bench_argv=bench_argv_from_mapping(merged_bench, where),
                cuda_graph=graph_mode_of(server_args),
                async_scheduling=async_mode_of(server_args),
                parallel=parallel_of(server_args),
                startup_timeout_s=float(server.get("startup_timeout_s", DEFAULT_STARTUP_TIMEOUT_S)),
                shutdown_grace_s=float(server.get("shutdown_grace_s", DEFAULT_SHUTDOWN_GRACE_S)),
            )
        )
    return config


def _bench_keys() -> set[str]:
    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)
    return {a.dest for a in parser._actions if a.dest != "help"} | {"request_rates"}


def load_config(path: str | Path) -> SweepConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from exc
    return parse_config(data, default_name=path.stem)


# --------------------------------------------------------------------------- server processes

_LIVE: set[ServerProcess] = set()


def _kill_live_servers() -> None:
    for server in list(_LIVE):
        server.stop()


atexit.register(_kill_live_servers)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _package_root() -> str:
    import graphwise

    locations = list(getattr(graphwise, "__path__", []))
    return str(Path(locations[0]).resolve().parent) if locations else os.getcwd()


def server_command(server_args: Sequence[str], host: str, port: int | str) -> list[str]:
    return [sys.executable, "-m", "graphwise.cli", "serve", *server_args] + [
        "--host",
        host,
        "--port",
        str(port),
    ]


class ServerError(RuntimeError):
    """The server did not come up (it exited, or /health never answered)."""


class ServerProcess:
    """`graphwise serve` in its own process group; `stop()` leaves nothing running."""

    def __init__(
        self,
        server_args: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S,
        command: Sequence[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        # `command` replaces `python -m graphwise.cli serve` (tests); {host}/{port} are filled in.
        self.command = (
            [c.format(host=host, port=self.port) for c in command]
            if command
            else server_command(server_args, host, self.port)
        )
        self.log_path = Path(log_path)
        self.env = env or {}
        self.shutdown_grace_s = shutdown_grace_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        env = dict(os.environ)
        root = _package_root()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.update(self.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("starting: %s", " ".join(self.command))
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(self.command) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: workers are stopped with it
            )
        _LIVE.add(self)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> None:
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        url = self.base_url + "/health"
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise ServerError(
                        f"the server exited with code {code} before it was ready "
                        f"(log: {self.log_path}); its last lines:\n{self.log_tail()}"
                    )
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"the server was not ready within {timeout_s:g} s at {url} "
                        f"(log: {self.log_path}); its last lines:\n{self.log_tail()}"
                    )
                time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period; always reaps."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group id is the leader's pid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_grace_s
        try:
            proc.wait(timeout=self.shutdown_grace_s)
        except subprocess.TimeoutExpired:
            logger.warning(
                "server pid %d ignored SIGTERM for %.0f s; killing", pgid, self.shutdown_grace_s
            )
        # Leftover workers of the group get the rest of the grace period, then SIGKILL.
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so `finally` blocks stop the servers."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread: leave it alone
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- running


def rate_label(rate: float) -> str:
    if math.isinf(rate):
        return "inf"
    return f"{rate:g}"


def _row(setup: Setup, rate: float, result: dict[str, Any] | None, error: str = "") -> dict:
    row: dict[str, Any] = {
        "setup": setup.name,
        "model": setup.label,
        "parallel": setup.parallel,
        "cuda_graph": setup.cuda_graph,
        "async_scheduling": setup.async_scheduling,
        "qps": rate_label(rate),
        "output_throughput": None,
        "mean_ttft_ms": None,
        "median_tpot_ms": None,
        "p99_ttft_ms": None,
        "p99_itl_ms": None,
        "completed": 0,
        "num_prompts": None,
        "error": error,
    }
    if result is not None:
        for key in (
            "output_throughput",
            "mean_ttft_ms",
            "median_tpot_ms",
            "p99_ttft_ms",
            "p99_itl_ms",
        ):
            row[key] = result.get(key)
        row["completed"] = result.get("completed", 0)
        row["num_prompts"] = result.get("num_prompts")
    return row


def run_setup(
    setup: Setup,
    output_dir: Path,
    disable_tqdm: bool = False,
    rows: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Start the setup's server, run every rate, stop it; appends one table row per rate to
    `rows` as each run ends (so an interrupted sweep keeps what it finished) and returns them."""
    rows = [] if rows is None else rows
    first = len(rows)
    server = ServerProcess(
        setup.server_args,
        output_dir / f"{setup.name}-server.log",
        env=setup.env,
        shutdown_grace_s=setup.shutdown_grace_s,
    )
    try:
        server.start()
        server.wait_ready(setup.startup_timeout_s)
        logger.info("%s: ready at %s", setup.name, server.base_url)
        for rate in setup.request_rates:
            if not server.alive():
                raise ServerError(
                    f"the server died (log: {server.log_path}); its last lines:\n"
                    f"{server.log_tail()}"
                )
            path = output_dir / f"{setup.name}-qps{rate_label(rate)}.json"
            argv = setup.bench_argv + ["--base-url", server.base_url, "--request-rate", str(rate)]
            if disable_tqdm:
                argv.append("--disable-tqdm")
            args = bench_serve.parse_args(argv)
            try:
                result = bench_serve.execute(args)
            except Exception as exc:  # one failed run must not end the sweep
                logger.error("%s at %s req/s failed: %s", setup.name, rate_label(rate), exc)
                logger.debug("traceback", exc_info=True)
                rows.append(_row(setup, rate, None, f"{type(exc).__name__}: {exc}"))
                continue
            result["setup"] = {
                "name": setup.name,
                "model": setup.label,
                "parallel": setup.parallel,
                "cuda_graph": setup.cuda_graph,
                "async_scheduling": setup.async_scheduling,
                "server_command": server.command,
            }
            bench_serve.save_result(result, path)
            print(bench_serve.format_result(result), flush=True)
            rows.append(_row(setup, rate, result))
    except ServerError as exc:
        logger.error("%s: %s", setup.name, exc)
        done = {r["qps"] for r in rows[first:]}
        rows += [
            _row(setup, rate, None, str(exc).splitlines()[0])
            for rate in setup.request_rates
            if rate_label(rate) not in done
        ]
    finally:
        server.stop()
    return rows[first:]


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_cells(row: dict[str, Any]) -> list[str]:
    completed = f"{row['completed']}/{row['num_prompts']}" if row["num_prompts"] else "0"
    graph = row["cuda_graph"]
    if row.get("async_scheduling") == "off":  # the seed's columns; the variant shown in the cell
        graph += " (async scheduling off)"
    return [
        row["model"],
        row["parallel"],
        graph,
        row["qps"],
        _cell(row["output_throughput"], 1),
        _cell(row["mean_ttft_ms"]),
        _cell(row["median_tpot_ms"]),
        _cell(row["p99_ttft_ms"]),
        _cell(row["p99_itl_ms"]),
        completed if not row["error"] else f"failed: {row['error'][:80]}",
    ]


def write_markdown(rows: Sequence[dict[str, Any]], path: Path, title: str, notes: str = "") -> None:
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines.append("| " + " | ".join(TABLE_COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in TABLE_COLUMNS) + "|")
    for row in rows:
        cells = [c.replace("|", "\\|") for c in table_cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


CSV_FIELDS = (
    "setup",
    "model",
    "parallel",
    "cuda_graph",
    "async_scheduling",
    "qps",
    "output_throughput",
    "mean_ttft_ms",
    "median_tpot_ms",
    "p99_ttft_ms",
    "p99_itl_ms",
    "completed",
    "num_prompts",
    "error",
)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})


def _notes(config: SweepConfig) -> str:
    first = bench_serve.parse_args(config.setups[0].bench_argv)
    dataset = first.dataset
    if dataset == "random":
        dataset += f" (in {first.random_input_len}, out {first.random_output_len})"
    elif first.sharegpt_output_len:
        dataset += f" (output {first.sharegpt_output_len})"
    return (
        f"{datetime.now():%Y-%m-%d %H:%M}; dataset {dataset}, {first.num_prompts} prompts, "
        f"seed {first.seed}, burstiness {first.burstiness}; throughput is output tokens/s, "
        "latencies are client-side."
    )


def write_outputs(config: SweepConfig, rows: list[dict[str, Any]], output_dir: Path) -> list[Path]:
    from graphwise.bench import plots

    notes = _notes(config)
    md, csv_path, js = output_dir / "sweep.md", output_dir / "sweep.csv", output_dir / "sweep.json"
    write_markdown(rows, md, config.name, notes)
    write_csv(rows, csv_path)
    js.write_text(json.dumps({"name": config.name, "notes": notes, "rows": rows}, indent=2) + "\n")
    return [md, csv_path, js, *plots.plot_sweep(rows, output_dir, config.name)]


def run_sweep(
    config: SweepConfig, output_dir: Path, fail_fast: bool = False, disable_tqdm: bool = False
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Run every setup; on Ctrl-C or SIGTERM the servers are stopped, the finished runs are
    still written, and KeyboardInterrupt is raised again."""
    output_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    interrupted = False
    with _terminate_as_interrupt():
        try:
            for setup in config.setups:
                setup_rows = run_setup(setup, output_dir, disable_tqdm, rows)
                if fail_fast and any(r["error"] for r in setup_rows):
                    break
        except KeyboardInterrupt:
            interrupted = True
            logger.warning(
                "interrupted: servers stopped; writing the %d finished run(s)", len(rows)
            )
        finally:
            _kill_live_servers()
    paths = write_outputs(config, rows, output_dir)
    if interrupted:
        raise KeyboardInterrupt
    return rows, paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="sweep YAML file (schema: see `graphwise.bench.sweep`)")
    parser.add_argument("--output-dir", default=None, help="default: the file's output_dir")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed setup")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, start nothing")
    parser.add_argument("--disable-tqdm", action="store_true")


def run(args: argparse.Namespace) -> int:
    bench_serve.quiet_http_logs()
    config = load_config(args.config)
    output_dir = Path(
        args.output_dir or config.output_dir or Path("benchmarks/results") / Path(args.config).stem
    )
    if args.dry_run:
        for setup in config.setups:
            print(
                f"[{setup.name}] {' '.join(server_command(setup.server_args, '127.0.0.1', 'PORT'))}"
            )
            rates = ", ".join(rate_label(r) for r in setup.request_rates)
            print(f"    bench serve {' '.join(setup.bench_argv)} at {rates} req/s")
        print(f"output: {output_dir}")
        return 0
    try:
        rows, paths = run_sweep(config, output_dir, args.fail_fast, args.disable_tqdm)
    except KeyboardInterrupt:
        print(f"interrupted; partial results in {output_dir}", file=sys.stderr)
        return 130
    print(Path(paths[0]).read_text())
    for path in paths:
        print(f"wrote {path}")
    failed = [r for r in rows if r["error"] or not r["completed"]]
    if failed:
        print(f"{len(failed)} of {len(rows)} runs failed", file=sys.stderr)
    return 1 if failed else 0
