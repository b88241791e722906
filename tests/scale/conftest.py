"""A real `tokenmill serve --replicas` on Ray Serve, in a subprocess on a free loopback port."""

import os
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

# Ray's start-up, then two replicas loading the model at once on two shared cores: over a minute here.
_START_TIMEOUT_S = 300


@dataclass
class RayServer:
    """A running `serve --replicas` process and where to reach it."""

    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        """The base URL, without /v1."""
        return f"http://127.0.0.1:{self.port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(smollm2_path, tmp_path_factory) -> Iterator[RayServer]:
    """Two replicas of smollm2-135m, one thread each, prefix-aware routing; stopped (and Ray with it) at the end."""
    pytest.importorskip("ray.serve", reason="the Ray tests run under `make test-ray`, which installs tokenmill[ray]")
    port = _free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenmill.cli", "serve", "--replicas", "2", "--num-threads", "1",
         "--port", str(port), "--model", "smollm2-135m"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True,
    )
    server = RayServer(process, port, log)
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        # NOTE: Serve's proxy answers as soon as one engine replica runs, while the other may still be loading
        # the model; the tests need both, which the "serving ... on 2 replicas" line (after serve.run returned,
        # every replica running) says.
        while not (_ready(server) and "serving smollm2-135m on 2 replicas" in log.read_text()):
            assert process.poll() is None, f"serve exited {process.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"serve did not come up:\n{log.read_text()}"
            time.sleep(1)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: Ray's workers go with it


def _ready(server: RayServer) -> bool:
    try:
        return httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 200
    except httpx.TransportError:
        return False
