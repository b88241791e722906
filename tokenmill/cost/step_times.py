"""A `bench profile` JSON read back: the engine's settings and the seconds a step of any composition takes."""

import bisect
import json
import math
from dataclasses import dataclass
from pathlib import Path

from tokenmill.errors import InvalidRequestError, whole_number

PROFILE_VERSION = 1  # the layout tokenmill/bench/profile.py writes


class StepTimes:
    """The profiled grid, interpolated (linearly, and extrapolated beyond its edges) over prompt tokens and decodes."""

    def __init__(self, grid: list[dict], sweep: list[dict]) -> None:
        rows: dict[int, dict[int, tuple[float, float]]] = {}
        for cell in grid:
            # Each cell's decodes held its measured mean context, a little above --context: they kept decoding
            # while the cell's prompts were timed.
            held = cell["decode_seqs"] * cell["decode_context"]
            rows.setdefault(cell["decode_seqs"], {})[cell["prefill_tokens"]] = (cell["ms"] / 1000, held)
        # Per decode count: the prompt sizes timed, their seconds and the keys their decodes held, sorted.
        self._rows = {d: (sorted(r), [r[p][0] for p in sorted(r)]) for d, r in rows.items()}
        self._held = {d: (sorted(r), [r[p][1] for p in sorted(r)]) for d, r in rows.items()}
        self._decodes = sorted(rows)
        self.per_context_token = _context_slope(sweep)
        # A simulation asks for the same compositions again and again: (seconds, keys held) of each.
        self._base: dict[tuple[int, int], tuple[float, float]] = {}

    def seconds(self, prefill_tokens: int, decode_seqs: int, decode_context: int = 0,
                prefill_context: int = 0) -> float:
        """One step that prefills prefill_tokens and decodes decode_seqs sequences.

        decode_context: the tokens those decodes attend to, in all; prefill_context: for each prompt chunk,
        its tokens times the tokens before it (a chunk after the first attends to the earlier ones).
        """
        key = (prefill_tokens, decode_seqs)
        if key not in self._base:
            self._base[key] = (_interpolate(self._rows, self._decodes, prefill_tokens, decode_seqs),
                               _interpolate(self._held, self._decodes, prefill_tokens, decode_seqs))
        base, held = self._base[key]
        # Attention reads grow with the keys actually held beyond those the grid's decodes held.
        extra = decode_context - held + prefill_context
        return max(base + self.per_context_token * extra, 0.0)


@dataclass(frozen=True)
class Profile:
    """One profiled engine: its label, the settings the scheduler ran with, its step times and its price."""

    path: Path
    label: str
    settings: dict
    times: StepTimes
    price_per_hour: float
    price_basis: str


_SETTINGS = ("quantization", "dtype", "max_num_seqs", "max_num_batched_tokens", "num_blocks", "block_size",
             "enable_prefix_caching", "max_model_len")


def load_profile(path: Path) -> Profile:
    """Read and check a profile; raises InvalidRequestError naming what to do about a bad file."""
    remedy = "make one with `tokenmill bench profile --out FILE`"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # unreadable, not UTF-8, not JSON, nested too deep
        raise InvalidRequestError(f"cannot read profile {path}: {exc}; {remedy}") from exc
    keys = {"version", "model", "settings", "context", "grid", "context_sweep", "price"}
    missing = keys - set(report) if isinstance(report, dict) else keys
    if missing:
        raise InvalidRequestError(f"{path} is not a tokenmill profile (missing {sorted(missing)}); {remedy}")
    if report["version"] != PROFILE_VERSION:
        raise InvalidRequestError(f"{path} is profile version {report['version']}, this tokenmill reads "
                                  f"{PROFILE_VERSION}; {remedy}")
    try:
        grid = report["grid"]
        if not any(c["decode_seqs"] == 0 for c in grid) or not any(c["prefill_tokens"] == 0 for c in grid):
            raise InvalidRequestError(f"{path} needs prompt-only and decode-only steps (0 in --decode-seqs and "
                                      f"--prefill-tokens); {remedy}")
        if len({c["prefill_tokens"] for c in grid if c["decode_seqs"] == 0 and c["prefill_tokens"]}) < 2:
            # One size would price every prompt-only step alike, whatever its length.
            raise InvalidRequestError(f"{path} needs prompt-only steps of two sizes (two above 0 in "
                                      f"--prefill-tokens); {remedy}")
        s = report["settings"]
        missing = sorted(k for k in _SETTINGS if k not in s)  # what the simulator and planner read
        if missing:
            raise InvalidRequestError(f"{path} is a malformed tokenmill profile (no settings.{missing[0]}); {remedy}")
        for name in ("num_blocks", "max_model_len"):  # the others EngineConfig checks as the simulation builds one
            if not whole_number(s[name]) or s[name] < 1:
                raise InvalidRequestError(f"{path} is a malformed tokenmill profile (settings.{name} {s[name]!r} is "
                                          f"not a count >= 1); {remedy}")
        # A step of no time (or NaN) simulates a run of no duration: the planner's rate search never ends.
        if not all(math.isfinite(c["ms"]) and c["ms"] > 0 for c in [*grid, *report["context_sweep"]]):
            raise InvalidRequestError(f"{path} has a step that took no time (ms not a positive number); {remedy}")
        price = report["price"]["usd_per_hour"]
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not 0 <= price < math.inf:
            raise InvalidRequestError(f"{path} is a malformed tokenmill profile (price.usd_per_hour {price!r} is "
                                      f"not a USD amount >= 0); {remedy}")
        label = (f"{report['model']} {s['quantization']} {s['dtype']} seqs={s['max_num_seqs']} "
                 f"tokens={s['max_num_batched_tokens']}")
        times = StepTimes(grid, report["context_sweep"])
        return Profile(path, label, s, times, price, report["price"]["basis"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a hand-edited file
        raise InvalidRequestError(f"{path} is a malformed tokenmill profile ({type(exc).__name__}: {exc}); "
                                  f"{remedy}") from exc


def _context_slope(sweep: list[dict]) -> float:
    """Seconds per decode per context token, least squares over the sweep; 0 without two contexts."""
    points = [(c["decode_seqs"] * c["decode_context"], c["ms"] / 1000) for c in sweep]
    if len({x for x, _ in points}) < 2:
        return 0.0
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return max(slope, 0.0)  # longer contexts never make a step faster; a negative fit is noise


def _interpolate(rows: dict[int, tuple[list[int], list[float]]], decodes: list[int], prefill_tokens: int,
                 decode_seqs: int) -> float:
    """A grid's value (seconds, or keys held) for any step: along prompt tokens in each row, then across rows."""
    if len(decodes) == 1:
        return _piecewise(prefill_tokens, *rows[decodes[0]])
    i = _upper(decodes, decode_seqs)
    lo, hi = decodes[i - 1], decodes[i]
    return _line(decode_seqs, lo, hi, _piecewise(prefill_tokens, *rows[lo]), _piecewise(prefill_tokens, *rows[hi]))


def _upper(xs: list[int], x: float) -> int:
    """Index of the right end of the segment of xs that holds x (the first or last segment beyond the ends)."""
    return min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)


def _piecewise(x: float, xs: list[int], ys: list[float]) -> float:
    """Piecewise-linear through (xs, ys), continued linearly beyond both ends."""
    if len(xs) == 1:
        return ys[0]
    i = _upper(xs, x)
    return _line(x, xs[i - 1], xs[i], ys[i - 1], ys[i])


def _line(x: float, x0: float, x1: float, y0: float, y1: float) -> float:
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
