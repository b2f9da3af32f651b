"""Shared fixtures: real pdserve servers started as subprocesses on 127.0.0.1 (default model)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import httpx
import pytest

import pdserve  # noqa: F401  first: PDSERVE_CPU_ISA caps torch's kernels too, before anything loads torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_TIMEOUT_S = 180.0
API_KEY = "test-key-123"
SERVED_MODEL_NAME = "smollm2-test"


@dataclass
class ServerProcess:
    base_url: str
    proc: subprocess.Popen
    log_path: str
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(module: str, args: Sequence[str], api_key: str | None = None, env: dict[str, str] | None = None,
          port: int | None = None, log_prefix: str = "pdserve-test-", host: str = "127.0.0.1",
          netns: str | None = None) -> ServerProcess:
    """`python -m module --host HOST --port P args...` in its own process group, logging to a temp file; inside
    network namespace `netns` when given (tests/netns_helpers.py)."""
    port = port or free_port()
    fd, log_path = tempfile.mkstemp(prefix=log_prefix, suffix=".log")
    cmd = [sys.executable, "-m", module, "--host", host, "--port", str(port), *args]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    if api_key:
        cmd += ["--api-key", api_key]
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    return ServerProcess(f"http://{host}:{port}", proc, log_path, api_key)


def wait_ok(server: ServerProcess, path: str, timeout: float, what: str, interval_s: float = 0.5,
            request_timeout_s: float = 60) -> ServerProcess:
    """Poll GET path until 200; a process that exits or a timeout stops it and raises with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {server.proc.returncode} during startup:\n{server.log()}")
        try:
            if httpx.get(server.base_url + path, headers=server.headers, timeout=request_timeout_s).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    stop_server(server)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{server.log()}")


def start_server(args: Sequence[str] = (), api_key: str | None = None,
                 timeout: float = STARTUP_TIMEOUT_S, env: dict[str, str] | None = None,
                 port: int | None = None, host: str = "127.0.0.1", netns: str | None = None) -> ServerProcess:
    """Start `python -m pdserve.launch_server` in its own process group; return once /health_generate is 200."""
    server = spawn("pdserve.launch_server", args, api_key, env, port, host=host, netns=netns)
    return wait_ok(server, "/health_generate", timeout, "server")


def stop_server(server: ServerProcess) -> None:
    """SIGTERM the whole process group (front + engine), SIGKILL what is left after 20 s."""
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(server.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.proc.wait(timeout=10)


def serve_for_module(request: pytest.FixtureRequest, args: Sequence[str],
                     api_key: str | None = None) -> Iterator[ServerProcess]:
    """A started server for a fixture; its log is printed when a test using it failed."""
    server = start_server(args, api_key=api_key)
    failed_before = request.session.testsfailed
    try:
        yield server
    finally:
        stop_server(server)
        if request.session.testsfailed > failed_before:
            print(f"\n----- server log ({' '.join(args)}) -----\n{server.log()[-20000:]}", file=sys.stderr)
        os.unlink(server.log_path)


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """The default model with default flags (radix cache on)."""
    yield from serve_for_module(request, ["--num-threads", "1"])


@pytest.fixture(scope="session")
def secured_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """--api-key and --served-model-name; radix cache off so that freed KV shows exactly in /get_load."""
    yield from serve_for_module(
        request, ["--num-threads", "1", "--served-model-name", SERVED_MODEL_NAME, "--disable-radix-cache"],
        api_key=API_KEY,
    )


@pytest.fixture(scope="session")
def tokenizer():
    from pdserve.model.loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(None).hf_dir)
