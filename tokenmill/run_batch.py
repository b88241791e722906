"""`tokenmill run-batch`: an OpenAI Batch API input file run offline through the server's own handlers.

Each line is answered exactly as `serve` would answer it over HTTP (the same validation, defaults and errors), with
the engine batching many lines at once; the output file has one line per input line, in input order, in the Batch
API's output shape. A file whose lines are not all well-formed requests is refused before anything runs, as OpenAI
refuses it at validation.
"""

import argparse
import asyncio
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import httpx
from tqdm import tqdm

from tokenmill.config import ServerConfig
from tokenmill.embeddings.batcher import BatchPolicy
from tokenmill.errors import InvalidRequestError
from tokenmill.flags import engine_config

if TYPE_CHECKING:  # FastAPI comes with the server, which main imports once the input file is known good
    from fastapi import FastAPI

# The endpoints a line may name: those of the server's that answer one JSON body.
URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings")


@dataclass
class BatchRequest:
    """One input line: the caller's id, the endpoint and the request body."""

    custom_id: str
    url: str
    body: dict


@dataclass
class Summary:
    """What a run did: lines by HTTP status, the answered ones' tokens, and the compute's cost."""

    statuses: dict[int, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    price_per_hour: float | None = None

    def add(self, status: int, body: dict) -> None:
        """Count one line's response."""
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status != 200:
            return
        usage = body.get("usage") or {}
        # /v1/responses names them input and output tokens.
        self.prompt_tokens += usage.get("prompt_tokens", usage.get("input_tokens", 0))
        self.completion_tokens += usage.get("completion_tokens", usage.get("output_tokens", 0))
        self.cost += usage.get("cost", 0.0)
        if "cost_details" in usage:
            self.price_per_hour = usage["cost_details"]["price_per_hour"]


def read_requests(path: Path) -> list[BatchRequest]:
    """Every line of the input file; raises InvalidRequestError naming the first line that is not a request."""
    try:
        # A BOM is no line's JSON; and only "\n" ends a line: JSON strings may hold U+2028, which splitlines splits.
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read {path}: {exc}") from exc
    requests: list[BatchRequest] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        request = _parse(line, f"{path}:{number}")
        if request.custom_id in seen:  # outputs are matched to inputs by it
            raise InvalidRequestError(f"{path}:{number}: custom_id {request.custom_id!r} is also on line "
                                      f"{seen[request.custom_id]}; each request needs its own")
        seen[request.custom_id] = number
        requests.append(request)
    if not requests:
        raise InvalidRequestError(f"{path} holds no requests: one JSON object per line, as OpenAI's Batch API takes")
    return requests


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is Python's, not JSON's")


def _finite(number: str) -> float:
    # 1e999 reads as infinity, which the request then could not be sent with (after the models loaded).
    if not math.isfinite(value := float(number)):
        raise ValueError(f"{number} is past a double's range")
    return value


def _parse(line: str, where: str) -> BatchRequest:
    try:
        entry = json.loads(line, parse_constant=_not_json, parse_float=_finite)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python's stack
        raise InvalidRequestError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(entry, dict):
        raise InvalidRequestError(f"{where}: a line must be a JSON object with custom_id, method, url and body")
    custom_id, method, url, body = (entry.get(k) for k in ("custom_id", "method", "url", "body"))
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidRequestError(f"{where}: custom_id must be a non-empty string")
    if method != "POST":
        raise InvalidRequestError(f"{where}: method must be \"POST\", not {method!r}")
    if url not in URLS:
        raise InvalidRequestError(f"{where}: url {url!r} is not one of {', '.join(URLS)}")
    if not isinstance(body, dict):
        raise InvalidRequestError(f"{where}: body must be a JSON object (the request {url} takes)")
    if body.get("stream"):
        raise InvalidRequestError(f"{where}: a batch request cannot stream; drop \"stream\" from its body")
    return BatchRequest(custom_id, url, body)


async def run(app: "FastAPI", requests: list[BatchRequest], out: IO[str], concurrency: int,
              progress: tqdm | None = None) -> Summary:
    """Answer every request through app, at most concurrency at once; write their lines to out in input order."""
    summary = Summary()
    done: dict[int, str] = {}
    written = 0
    slots = asyncio.Semaphore(concurrency)

    async def answer(client: httpx.AsyncClient, i: int, request: BatchRequest) -> None:
        nonlocal written
        async with slots:
            response = await client.post(request.url, json=request.body)
        body = response.json()
        summary.add(response.status_code, body)
        done[i] = json.dumps({
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": request.custom_id,
            "response": {"status_code": response.status_code,
                         "request_id": body.get("id") or f"req_{uuid.uuid4().hex}", "body": body},
            "error": None,  # as OpenAI's: for failures outside HTTP; a refused request is its 4xx response
        })
        while written in done:  # the lines before it are out: a run cut short keeps every line written so far
            out.write(done.pop(written) + "\n")
            written += 1
        out.flush()
        if progress is not None:
            progress.update()

    # Through the app in process, as an HTTP client would call it: every line gets what `serve` would answer.
    async with app.router.lifespan_context(app):
        # raise_app_exceptions off: a request the app fails on is that line's 500, not the end of the run.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://tokenmill", timeout=None) as client:
            await asyncio.gather(*(answer(client, i, r) for i, r in enumerate(requests)))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """run-batch's own flags (the engine's are added by the caller)."""
    parser.add_argument("-i", "--input-file", required=True, type=Path,
                        help="JSONL, one request per line: {\"custom_id\", \"method\": \"POST\", \"url\", \"body\"}")
    parser.add_argument("-o", "--output-file", required=True, type=Path,
                        help="JSONL, one line per request in input order: {\"id\", \"custom_id\", \"response\": "
                             "{\"status_code\", \"request_id\", \"body\"}, \"error\"}")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="requests in the engine at once (default: twice --max-num-seqs)")


def main(args: argparse.Namespace) -> int:
    """Check the input file, load the models as `serve` does, run every line; print what it did to stderr."""
    requests = read_requests(args.input_file)
    from tokenmill.server.app import load_app  # imports torch: after the input file is known good

    concurrency = 2 * args.max_num_seqs if args.max_concurrency is None else args.max_concurrency
    if concurrency < 1:
        raise InvalidRequestError(f"--max-concurrency {concurrency} must be at least 1")
    # Nothing refused for waiting (counted in prompts, which a line may hold hundreds of): run caps the lines.
    config = ServerConfig(max_waiting=sys.maxsize, reasoning_parser=args.reasoning_parser)
    # Opened before the models load, so that a folder that is not there fails first; emptied only once they have.
    with args.output_file.open("a", encoding="utf-8") as out:
        app = load_app(engine_config(args), config, args.models or [args.model],
                       BatchPolicy(args.embedding_max_batch_tokens, args.embedding_max_wait_ms), args.embedding_dtype)
        if out.seekable():  # not -o /dev/stdout into a pipe
            out.truncate(0)
        start = time.perf_counter()
        with tqdm(total=len(requests), unit="req", desc="run-batch", disable=None) as progress:
            summary = asyncio.run(run(app, requests, out, concurrency, progress))
    seconds = time.perf_counter() - start
    answered = summary.statuses.get(200, 0)
    failed = ", ".join(f"{n} x {status}" for status, n in sorted(summary.statuses.items()) if status != 200)
    price = f" at ${summary.price_per_hour:g}/h" if summary.price_per_hour is not None else ""
    print(f"tokenmill: {len(requests)} requests in {seconds:.1f} s: {answered} answered"
          f"{f', {len(requests) - answered} failed ({failed}; see their lines)' if failed else ''}; "
          f"{summary.prompt_tokens} prompt + {summary.completion_tokens} completion tokens; "
          f"cost ${summary.cost:.6f}{price}; wrote {args.output_file}", file=sys.stderr)
    return 0
