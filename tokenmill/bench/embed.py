"""`tokenmill bench embed`: embedding throughput offline and over HTTP, against transformers in the same run."""

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np

from tokenmill.bench.datasets import TOPICS
from tokenmill.errors import InvalidRequestError
from tokenmill.flags import workload_seed
from tokenmill.loader import catalog

if TYPE_CHECKING:
    from tokenmill.embeddings.embedder import Embedder

# Clauses joined into sentences of 1 to 6 clauses: about 8 to 70 tokens, so padding matters.
_CLAUSES = [
    "the committee published its findings about {}", "a student asked a question on {}",
    "nobody expected the debate over {} to last so long", "she wrote three chapters on {}",
    "the museum opened an exhibition about {}", "researchers disagree about {}",
    "the podcast spent an hour discussing {}", "my grandfather still tells stories about {}",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench embed` flags."""
    parser.add_argument("--model", default="all-minilm-l6-v2", help="an embedding model (catalog name or folder)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="tokenmill's linear layers (transformers runs float32, as it loads)")
    parser.add_argument("--num-sentences", type=int, default=1000, help="sentences for the offline figure")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients, one sentence a request")
    parser.add_argument("--requests", type=int, default=1000, help="HTTP requests per server configuration")
    parser.add_argument("--batch-size", type=int, default=32, help="transformers' batch (sentence-transformers')")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every measurement, alternating; each figure is its best round (shared machines)")
    parser.add_argument("--seed", type=workload_seed, default=0)


def sentences(count: int, seed: int) -> list[str]:
    """Varied sentences of 1 to 6 clauses, reproducible from the seed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        clauses = [_CLAUSES[rng.integers(len(_CLAUSES))].format(TOPICS[rng.integers(len(TOPICS))])
                   for _ in range(rng.integers(1, 7))]
        out.append("; ".join(clauses).capitalize() + ".")
    return out


def main(args: argparse.Namespace) -> int:
    """Offline and HTTP throughput, each tokenmill figure with its ratio to transformers; prints a table."""
    from tokenmill.embeddings.embedder import Embedder

    counts = ("num_sentences", "clients", "requests", "batch_size", "rounds")
    if any(getattr(args, name) < 1 for name in counts):  # else an empty table or a division by zero, after a run
        raise InvalidRequestError(f"need {', '.join('--' + name.replace('_', '-') for name in counts)} >= 1")
    texts, requests = sentences(args.num_sentences, args.seed), sentences(args.requests, args.seed + 1)
    embedder, reference = Embedder(args.model, args.dtype), _Reference(_folder(args.model))
    _check_agreement(embedder, reference, texts)
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, rate in [*_offline(args, embedder, reference, texts), *_http(args, reference, requests)]:
            best[name] = max(best.get(name, 0.0), rate)
    offline_peer, http_peer = _OFFLINE_PEER.format(args.batch_size), _HTTP_PEER
    width = max(map(len, best))
    print(f"{'':{width}}  sentences/s  vs transformers")
    for name, rate in best.items():
        peer = offline_peer if name.startswith("Embedder") else http_peer if name.startswith("/v1") else None
        ratio = f"{rate / best[peer]:14.2f}x" if peer else ""
        print(f"{name:{width}}  {rate:11.1f}  {ratio}")
    return 0


# The peers the ratios are against: sentence-transformers' own way (batches of 32 sorted by length), and for
# HTTP what a server without batching could do at best (one forward pass per request, no HTTP costs).
_OFFLINE_PEER = "transformers, batches of {} sorted by length"
_HTTP_PEER = "transformers, one sentence per pass, no HTTP"


def _check_agreement(embedder: "Embedder", reference: "_Reference", texts: list[str]) -> None:
    import torch

    cosine = torch.nn.functional.cosine_similarity(embedder.embed(texts), reference.embed(texts, 32, sort=False))
    print(f"{len(texts)} sentences: min cosine to transformers {cosine.min().item():.6f}", file=sys.stderr)


def _offline(args: argparse.Namespace, embedder: "Embedder", reference: "_Reference",
             texts: list[str]) -> list[tuple[str, float]]:
    return [
        (f"transformers, batches of {args.batch_size} in input order",
         _rate(lambda: reference.embed(texts, args.batch_size, sort=False), len(texts))),
        (_OFFLINE_PEER.format(args.batch_size),
         _rate(lambda: reference.embed(texts, args.batch_size, sort=True), len(texts))),
        (f"Embedder.embed ({args.dtype})", _rate(lambda: embedder.embed(texts), len(texts))),
    ]


def _http(args: argparse.Namespace, reference: "_Reference", texts: list[str]) -> list[tuple[str, float]]:
    rows = [(_HTTP_PEER, _rate(lambda: reference.embed(texts, 1, sort=False), len(texts)))]
    for label, flags in (("default", []), ("wait limit 0", ["--embedding-max-wait-ms", "0"]),
                         ("no batching", ["--embedding-max-batch-tokens", "1"])):
        rows.append((f"/v1/embeddings, {args.clients} clients, {label}", _serve_and_load(args, texts, flags)))
    return rows


_SERVED = "bench-embedder"


def _serve_and_load(args: argparse.Namespace, texts: list[str], flags: list[str]) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Served under a name of its own: a folder's own would be its last part, not the path --model gave.
    server = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--model", f"{_SERVED}={args.model}",
                               "--port", str(port), "--embedding-dtype", args.dtype, *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server)
        asyncio.run(_load(url, _SERVED, texts[:32], args.clients))  # warm-up
        before = _batching(url)
        start = time.perf_counter()
        asyncio.run(_load(url, _SERVED, texts, args.clients))
        rate = len(texts) / (time.perf_counter() - start)
        after = _batching(url)
        inputs, passes, waited = (a - b for a, b in zip(after, before))
        print(f"server {' '.join(flags) or 'defaults'}: {rate:.1f} sentences/s, {inputs / passes:.1f} inputs per "
              f"pass, {waited / inputs * 1000:.1f} ms mean queue wait", file=sys.stderr)
        return rate
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


async def _load(url: str, model: str, texts: list[str], clients: int) -> None:
    queue = iter(texts)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        async def client() -> None:
            for text in queue:  # NOTE: one shared iterator: each text is sent once, by whichever client is free
                response = await http.post("/v1/embeddings", json={"model": model, "input": text})
                response.raise_for_status()

        await asyncio.gather(*(client() for _ in range(clients)))


def _batching(url: str) -> tuple[float, float, float]:
    """The server's embedded inputs, forward passes and summed queue seconds so far, from /metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name = line.split("{")[0]
        if name in ("tokenmill:embedding_batch_size_sum", "tokenmill:embedding_batch_size_count",
                    "tokenmill:embedding_queue_time_seconds_sum"):
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return (values.get("tokenmill:embedding_batch_size_sum", 0.0),
            values.get("tokenmill:embedding_batch_size_count", 0.0),
            values.get("tokenmill:embedding_queue_time_seconds_sum", 0.0))


def _wait_healthy(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError("the server did not come up in 180 s")


def _folder(model: str) -> str:
    return model if Path(model).is_dir() else str(catalog.pull(model))


def _rate(run: Callable, count: int) -> float:
    run()  # warm-up: the first pass of each shape pays for oneDNN's and the allocator's set-up
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


class _Reference:
    """transformers' BertModel with sentence-transformers' mean pooling and normalization, float32."""

    def __init__(self, path: str) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def embed(self, texts: list[str], batch_size: int, sort: bool):
        """Embeddings in input order; sort runs the batches by length, as sentence-transformers' encode does."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if sort else list(range(len(texts)))
        out = torch.empty(len(texts), self.model.config.hidden_size)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = order[start:start + batch_size]
                encoded = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=256,
                                         return_tensors="pt")
                hidden = self.model(**encoded).last_hidden_state
                mask = encoded["attention_mask"].unsqueeze(-1).float()
                out[batch] = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        return out
