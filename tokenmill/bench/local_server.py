"""A `tokenmill serve` in a subprocess on a free loopback port, for commands and tests that start their own."""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

_START_TIMEOUT_S = 180


@dataclass
class LocalServer:
    """A started `tokenmill serve` process, where to reach it, and where its output goes (None: discarded)."""

    process: subprocess.Popen
    url: str
    log: Path | None = None

    def signal_stop(self) -> None:
        """SIGTERM, if it still runs: it finishes what is in flight, then exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait; returns the exit code."""
        self.signal_stop()
        return self.process.wait(timeout)


def start_server(flags: list[str], log: Path | None = None) -> LocalServer:
    """Start `tokenmill serve` with these flags and wait until /health answers; RuntimeError if it does not."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with log.open("w") if log else open(os.devnull, "w") as output:  # the child keeps its own copy
        process = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port), *flags],
                                   stdout=output, stderr=subprocess.STDOUT, env=os.environ.copy())
    server = LocalServer(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}{_why(log)}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"the server did not come up in {_START_TIMEOUT_S} s{_why(log)}")


def _why(log: Path | None) -> str:
    """The server's output so far, or where to see it."""
    return f":\n{log.read_text()}" if log else "; run `tokenmill serve` to see why"
