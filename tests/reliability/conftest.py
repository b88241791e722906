"""A loopback `tokenmill serve` of the default model for the fuzz tests."""

import pytest

from tokenmill.bench.local_server import LocalServer, start_server

MODEL = "smollm2-135m"


@pytest.fixture(scope="session")
def small_server(smollm2_path) -> LocalServer:
    """The default model with a small KV pool (preemption happens) and a short context (answers stay short)."""
    server = start_server(["--model", MODEL, "--kv-cache-memory", "0.05", "--max-model-len", "64"])
    yield server
    server.stop()
