"""Deadlines over HTTP: the headers that set them, the 429 for one that cannot be met, the mark on a late answer."""

import math
from dataclasses import replace

from fastapi import Request

from tokenmill.outputs import RequestOutput
from tokenmill.sampling import SamplingParams
from tokenmill.server.errors import APIError

# Milliseconds from arrival for the whole answer, and for its first token.
DEADLINE_HEADER = "x-tokenmill-deadline-ms"
TTFT_DEADLINE_HEADER = "x-tokenmill-ttft-deadline-ms"
# On an answer to a request with a deadline: `met` or `missed` (served, but late). Streams, whose headers go out
# first, carry it as the `deadline_status` field of a chunk of its own after the choices' last (choices empty, as
# the usage chunk's).
STATUS_HEADER = "x-tokenmill-deadline"


def with_deadlines(request: Request, params: SamplingParams) -> SamplingParams:
    """params with the deadlines the request's headers set; 400 naming the header for a bad value."""
    values = {}
    for header, name in ((DEADLINE_HEADER, "deadline_ms"), (TTFT_DEADLINE_HEADER, "ttft_deadline_ms")):
        raw = request.headers.get(header)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not 0 < value < math.inf:
            raise APIError(400, f"{header}: {raw!r} must be a positive number of milliseconds", param=header)
        values[name] = value
    return replace(params, **values) if values else params


def deadline_refused(message: str) -> APIError:
    """The error for a request whose deadline cannot be met: refused on arrival, or dropped while waiting."""
    # Retry-After as the other 429s say it: the queue that made the deadline impossible moves on within a second.
    return APIError(429, message, type="rate_limit_error", code="deadline_infeasible", headers={"Retry-After": "1"})


def dropped_error(output: RequestOutput) -> APIError | None:
    """The error to answer with if the engine dropped this request because its deadline became infeasible."""
    message = output.metrics.deadline_error
    return None if message is None else deadline_refused(message)


def deadline_status(outputs: list[RequestOutput]) -> str | None:
    """`missed` if any of these finished outputs was late, `met` if all had deadlines and none was; else None."""
    statuses = [o.metrics.deadline_status for o in outputs if o.metrics.deadline_status is not None]
    if not statuses:
        return None
    return "missed" if "missed" in statuses else "met"
