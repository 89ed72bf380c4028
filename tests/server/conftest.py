"""A real `graphwise serve` subprocess on loopback, shared by the tests of a session.

Loading the embedded model takes ~15 s on CPU, so one server serves every test that leaves it
running; tests that must stop a server (SIGTERM) start their own with `start_server`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

API_KEY = "sk-graphwise-test"
STARTUP_TIMEOUT_S = 240.0  # a loaded 2-core machine can take several times the usual ~20 s


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    api_key: str = API_KEY

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; never leaves an orphan."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if pytest dies without tearing down (no orphans)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from Prometheus text: the sample `name` whose labels include those
    given (`labels` like 'mode="eager"'; every sample also carries model_name)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    found = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and wanted.items() <= sample.labels.items()
    ]
    assert len(found) == 1, f"metric {name}{{{labels}}}: {len(found)} samples match"
    return float(found[0])


def start_server(tmp_dir: Path, *extra: str) -> Server:
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "graphwise.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-num-seqs",
        "64",
        "--max-model-len",
        "1024",
        "--kv-cache-memory",
        str(256 * 1024 * 1024),  # ~360 blocks: enough for the load test, half the default
        "--api-key",
        API_KEY,
        "--disable-access-log",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        )
    server = Server(proc, port, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {proc.returncode} during start-up:\n{server.log_tail()}"
                    )
                try:
                    if client.get(server.url + "/health").status_code == 200:
                        return server
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"server not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{server.log_tail()}"
                    )
                time.sleep(0.25)
    except BaseException:
        server.stop(timeout=5)
        raise


@pytest.fixture(scope="session")
def server_factory():  # noqa: ANN201 - (tmp_dir, *extra_args) -> Server
    """`start_server`, for tests that need a server of their own (to stop it, say)."""
    return start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("server"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, trust_env=False, timeout=60) as c:
        yield c


@pytest.fixture
def client(server: Server):  # noqa: ANN201 - openai.OpenAI
    import openai

    http_client = httpx.Client(trust_env=False, timeout=60)
    c = openai.OpenAI(
        base_url=server.base_url, api_key=API_KEY, max_retries=0, http_client=http_client
    )
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="session")
def model_name(server: Server) -> str:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(trust_env=False, timeout=10) as c:
        return c.get(server.base_url + "/models", headers=headers).json()["data"][0]["id"]


@pytest.fixture(scope="session")
def metric():  # noqa: ANN201 - (text, name, labels="") -> float
    """Parse one sample out of /metrics text."""
    return _metric


@pytest.fixture(scope="session")
def default_tokenizer():  # noqa: ANN201 - the embedded model's HF tokenizer
    """The embedded default model's tokenizer alone (seconds to load; no model weights)."""
    from graphwise.bench.datasets import load_tokenizer
    from graphwise.models.default import default_model_path

    return load_tokenizer(str(default_model_path()))
