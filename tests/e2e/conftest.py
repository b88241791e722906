"""A real `tokenmill serve` in a subprocess on a free loopback port, with the real default model."""

import httpx
import pytest

from tokenmill.bench.local_server import LocalServer, start_server as start_local_server


class Server(LocalServer):
    """A started server, with its log, and its Prometheus samples read back."""

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


@pytest.fixture(scope="session")
def start_server(smollm2_path, tmp_path_factory):
    """Start `tokenmill serve` with extra flags; waits until /health answers, stops it at session end."""
    started: list[Server] = []

    def start(*flags: str) -> Server:
        local = start_local_server(list(flags), tmp_path_factory.mktemp("server") / "server.log")
        started.append(Server(local.process, local.url, local.log))
        return started[-1]

    yield start
    # All signalled before any is waited for: each takes a second or two to exit.
    for server in started:
        server.signal_stop()
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server) -> Server:
    """The default server: default model, no API key, default limits."""
    return start_server()
