"""A real `tokenmill serve` in a subprocess on a free loopback port, with the real default model."""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


@dataclass
class Server:
    """A running server process and where to reach it."""

    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        """The base URL, without /v1."""
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        """One sample from /metrics (summed over label sets that match the given labels)."""
        total, found = 0.0, False
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            key, value = line.rsplit(" ", 1)
            if key.split("{")[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
                total, found = total + float(value), True
        assert found, f"no metric {name} {labels}"
        return total

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def start_server(smollm2_path, tmp_path_factory):
    """Start `tokenmill serve` with extra flags; waits until /health answers, stops it at session end."""
    started: list[Server] = []

    def start(*flags: str) -> Server:
        port = _free_port()
        log = tmp_path_factory.mktemp("server") / "server.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port), *flags],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ.copy(),
        )
        server = Server(process, port, log)
        started.append(server)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, f"server exited {process.returncode}:\n{log.read_text()}"
            try:
                if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server did not come up:\n{log.read_text()}")

    yield start
    # All signalled before any is waited for: each takes a second or two to exit.
    for server in started:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
    for server in started:
        server.process.wait(60)


@pytest.fixture(scope="session")
def server(start_server) -> Server:
    """The default server: default model, no API key, default limits."""
    return start_server()
