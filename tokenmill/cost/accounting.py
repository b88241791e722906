"""Cost accounting: each engine step's measured seconds, split among the sequences in it by the work each did."""

import math
import time
from itertools import combinations

import numpy as np

# Row work: (prefill tokens, decode tokens) one sequence computed in a step.
Work = tuple[int, int]


class StepTimeModel:
    """Online least squares of step seconds ≈ a·prefill_tokens + b·decode_tokens + c, with a, b, c ≥ 0.

    A prompt token and a decode token cost differently (a prefill row is a matrix-matrix product, a decode
    row re-reads every weight for one token), and by how much depends on the machine and the model, so
    the ratio is fitted from the steps themselves rather than assumed (SmolLM2-135M, int4, 2 cores: 0.46 ms
    per prompt token, 0.8 ms per decode token, 5.7 ms per step). c is what a step costs whatever is in it
    (sampling, Python, kernel launches). The fit keeps the sums of the normal equations, so an update is
    O(1) and every step ever measured counts the same.
    """

    def __init__(self) -> None:
        self._xtx = np.zeros((3, 3))
        self._xty = np.zeros(3)
        self._yty = 0.0
        self.num_steps = 0
        # The coefficients as of the last read; None once a step is added. Refitting takes 0.1-0.2 ms (lstsq),
        # and most steps (decodes alone, no deadlines) never read them.
        self._fitted: tuple[float, float, float] | None = (0.0, 0.0, 0.0)

    def observe(self, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        """Add one measured step; the fit follows on the next read."""
        x = np.array([prefill_tokens, decode_tokens, 1.0])
        self._xtx += np.outer(x, x)
        self._xty += x * seconds
        self._yty += seconds * seconds
        self.num_steps += 1
        self._fitted = None

    @property
    def per_prefill_token(self) -> float:
        """Seconds per prompt token."""
        return self._coefficients()[0]

    @property
    def per_decode_token(self) -> float:
        """Seconds per decoded token."""
        return self._coefficients()[1]

    @property
    def per_step(self) -> float:
        """Seconds a step costs whatever is in it."""
        return self._coefficients()[2]

    def _coefficients(self) -> tuple[float, float, float]:
        if self._fitted is None:
            self._fitted = self._fit()
        return self._fitted

    def _fit(self) -> tuple[float, float, float]:
        """Non-negative least squares: the plain fit if it is non-negative, else the best fit on fewer terms."""
        # The unconstrained minimum, when non-negative, is the constrained one too; otherwise the optimum lies
        # where some coefficients are 0, and with three terms trying each such face is cheap and exact.
        theta = self._solve([0, 1, 2])
        if (theta >= 0).all():
            return tuple(theta.tolist())
        best, best_sse = np.zeros(3), self._yty
        for terms in [*combinations(range(3), 2), *combinations(range(3), 1)]:
            theta = self._solve(list(terms))
            sse = self._yty - 2 * theta @ self._xty + theta @ self._xtx @ theta
            if (theta >= 0).all() and sse < best_sse:
                best, best_sse = theta, sse
        return tuple(best.tolist())

    def _solve(self, terms: list[int]) -> np.ndarray:
        """The least-squares coefficients using only these terms (the others 0)."""
        theta = np.zeros(3)
        # lstsq, not solve: with only decodes of one batch size so far, decode tokens and the per-step term
        # are collinear; any minimizer (lstsq gives the smallest) splits such steps the same way.
        theta[terms] = np.linalg.lstsq(self._xtx[np.ix_(terms, terms)], self._xty[terms], rcond=None)[0]
        return theta

    def split(self, rows: list[Work], seconds: float) -> list[tuple[float, float]]:
        """Each row's (prefill, decode) seconds of a step that took `seconds`; together they are `seconds`."""
        if len(set(rows)) == 1 and not all(rows[0]):
            # Like rows, each all prompt or all decode (a decode-only step): equal shares whatever the fit.
            weights = [(float(p), float(d)) for p, d in rows]
        else:
            # Each row is weighed by its predicted time, the per-step term shared evenly by the rows; the weights
            # only set the proportions, so the measured time (not the prediction) is what gets split.
            per_prefill, per_decode, per_step = self._coefficients()
            overhead = per_step / len(rows)
            weights = [(per_prefill * p + overhead * p / (p + d), per_decode * d + overhead * d / (p + d))
                       for p, d in rows]
        total = math.fsum(wp + wd for wp, wd in weights)
        if total <= 0:  # nothing fitted yet that these rows use: fall back to tokens, all alike
            weights, total = [(float(p), float(d)) for p, d in rows], float(sum(p + d for p, d in rows))
        shares = [(seconds * wp / total, seconds * wd / total) for wp, wd in weights]
        # NOTE: the largest share takes what rounding left over, so that the shares add up to the measured time
        # (and a share that should be 0 never turns slightly negative).
        big = max(range(len(rows)), key=lambda i: sum(weights[i]))  # not by share: a 0 s step's are all 0
        rest = seconds - math.fsum(part for i, share in enumerate(shares) if i != big for part in share)
        wp, wd = weights[big]
        if wp >= wd:
            decode = rest * wd / (wp + wd)
            shares[big] = (rest - decode, decode)
        else:
            prefill = rest * wp / (wp + wd)
            shares[big] = (prefill, rest - prefill)
        return shares


class CostAccountant:
    """One engine's bill: its busy seconds, measured step by step and split among the sequences, at a price."""

    def __init__(self, price_per_hour: float, started: float | None = None) -> None:
        self.price_per_hour = price_per_hour
        # The machine is billed from here, busy or idle.
        self.started = time.perf_counter() if started is None else started
        self.busy_seconds = 0.0
        self.model = StepTimeModel()

    def charge(self, rows: list[Work], seconds: float, sample: bool = True) -> list[tuple[float, float]]:
        """Record a step of `seconds` with these rows (as a sample of a step's cost unless sample is false: a step
        that failed partway); return each row's (prefill, decode) seconds."""
        if sample:
            self.model.observe(sum(p for p, _ in rows), sum(d for _, d in rows), seconds)
        self.busy_seconds += seconds
        return self.model.split(rows, seconds)

    def uptime(self, now: float | None = None) -> float:
        """Seconds billed so far: since the engine started, idle time included."""
        return (time.perf_counter() if now is None else now) - self.started


def usd(seconds: float, price_per_hour: float) -> float:
    """What `seconds` of the machine cost."""
    return seconds * price_per_hour / 3600


def usd_per_million_tokens(seconds: float, tokens: int, price_per_hour: float) -> float:
    """USD per 1M tokens when `tokens` took `seconds` of the machine; NaN before any token."""
    return usd(seconds, price_per_hour) / tokens * 1e6 if tokens else math.nan
