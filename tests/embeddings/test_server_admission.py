"""/v1/embeddings bounds its queue as the generative models' is bounded: a 429 past --max-waiting, none lost."""

import time
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient

from tokenmill.config import ServerConfig
from tokenmill.embeddings.model import EmbeddingModel
from tokenmill.server import served_models
from tokenmill.server.app import build_app


def test_requests_past_max_waiting_are_refused_with_429_and_the_rest_answered(minilm_path):
    app = build_app({}, ServerConfig(max_waiting=3), {"minilm": EmbeddingModel.load(str(minilm_path), "float32")})
    body = {"model": "minilm", "input": ["a short sentence to embed"] * 4}
    with TestClient(app) as client, ThreadPoolExecutor(8) as pool:
        served_models.turns.__enter__()  # no forward pass runs meanwhile: every admitted request stays waiting
        try:
            futures = [pool.submit(client.post, "/v1/embeddings", json=body) for _ in range(8)]
            deadline = time.monotonic() + 30
            while sum(f.done() for f in futures) < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = [f.result() for f in futures if f.done()]
        finally:
            served_models.turns.__exit__(None, None, None)
        statuses = sorted(f.result().status_code for f in futures)
    assert len(refused) == 5 and all(r.status_code == 429 for r in refused)
    assert refused[0].json()["error"]["code"] == "too_many_waiting_requests"
    assert statuses == [200] * 3 + [429] * 5
