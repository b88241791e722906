"""The quality-cost curve of each routing policy, computed from every model's recorded answers without re-running."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.router.labeled import LEVELS, Item
from tokenmill.router.policies import escalate_to

# Cascade thresholds the table always shows: round mean-logprob values a user would pass to
# `serve --cascade-threshold`, from never escalating (-inf) to always (+inf).
TABLE_THRESHOLDS = (-math.inf, -3.0, -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, -0.1, math.inf)


@dataclass
class Answer:
    """One model's answer to one item: its text, whether it is right, its confidence and what it cost."""

    text: str
    correct: bool
    confidence: float  # policies.mean_logprob of the answer, as the server's cascade judges it
    cost_usd: float


@dataclass
class Record:
    """An item and every model's answer to it, in --model order (cheap to strong)."""

    item: Item
    answers: list[Answer]


@dataclass
class Point:
    """A policy's quality (fraction right), by level too, and mean USD per item over the set."""

    policy: str
    quality: float
    cost_usd: float
    by_level: dict[str, float]
    threshold: float | None = None  # cascade only
    escalated: float | None = None  # cascade only: the fraction of items re-run on the stronger model


def single(records: Sequence[Record], index: int, name: str) -> Point:
    """Every item answered by model `index` alone."""
    return _point(name, records, [(r.answers[index].correct, r.answers[index].cost_usd) for r in records])


def cheapest(records: Sequence[Record]) -> Point:
    """The `cheapest` policy: every item fits every model (the run would have failed otherwise), so the first."""
    return _point("cheapest", records, [(r.answers[0].correct, r.answers[0].cost_usd) for r in records])


def cascade(records: Sequence[Record], threshold: float) -> Point:
    """The `cascade` policy at a threshold, as the server runs it: an escalated item costs both models' runs."""
    outcomes, escalated = [], 0
    for record in records:
        first = record.answers[0]
        route = escalate_to(first.confidence, threshold, 0, range(len(record.answers)))
        if route.index == 0:
            outcomes.append((first.correct, first.cost_usd))
        else:
            escalated += 1
            second = record.answers[route.index]
            outcomes.append((second.correct, first.cost_usd + second.cost_usd))
    point = _point("cascade", records, outcomes)
    point.threshold, point.escalated = threshold, escalated / len(records)
    return point


def sweep(records: Sequence[Record]) -> list[float]:
    """Thresholds giving every distinct cascade: -inf, midpoints between the cheap model's confidences, +inf."""
    # Midpoints rather than the confidences themselves: a threshold equal to an answer's confidence keeps it
    # (>=), so a threshold on the boundary would flip with the last digit of a logprob.
    levels = sorted({r.answers[0].confidence for r in records})
    return [-math.inf, *((a + b) / 2 for a, b in zip(levels, levels[1:])), math.inf]


def curve(records: Sequence[Record], names: Sequence[str]) -> list[Point]:
    """Each model alone, `cheapest`, and `cascade` at every threshold of the sweep and the table's."""
    thresholds = sorted(set(sweep(records)) | set(TABLE_THRESHOLDS))
    return [*(single(records, i, name) for i, name in enumerate(names)), cheapest(records),
            *(cascade(records, t) for t in thresholds)]


def default_target(records: Sequence[Record]) -> float:
    """0.9 of the quality of the model the cascade escalates to (the second), the ceiling of its always-escalate end."""
    return 0.9 * cascade(records, math.inf).quality


def best_threshold(points: Sequence[Point], target: float) -> Point | None:
    """The cheapest cascade point at or above the target quality (on a tie, the better, then the lower threshold)."""
    reaching = [p for p in points if p.policy == "cascade" and p.quality >= target]
    return min(reaching, key=lambda p: (p.cost_usd, -p.quality, p.threshold), default=None)


def table(points: Sequence[Point], best: Point | None) -> str:
    """Single models, `cheapest`, and the cascade at the table's thresholds and the best one, one row each."""
    shown = [p for p in points if p.policy != "cascade" or p.threshold in TABLE_THRESHOLDS or p is best]
    header = f"{'policy':<18}{'threshold':>10}{'quality':>9}{'easy':>7}{'hard':>7}{'USD/item':>12}{'escalated':>11}"
    rows = [header]
    for p in shown:
        threshold = "" if p.threshold is None else f"{p.threshold:.4g}"
        escalated = "" if p.escalated is None else f"{p.escalated:.0%}"
        levels = "".join(f"{p.by_level.get(level, math.nan):>7.2f}" for level in LEVELS)
        mark = "  <- best" if p is best else ""
        rows.append(f"{p.policy:<18}{threshold:>10}{p.quality:>9.3f}{levels}{p.cost_usd:>12.3g}{escalated:>11}{mark}")
    return "\n".join(rows)


def _point(policy: str, records: Sequence[Record], outcomes: Sequence[tuple[bool, float]]) -> Point:
    by_level = {}
    for level in LEVELS:
        right = [correct for r, (correct, _) in zip(records, outcomes) if r.item.level == level]
        if right:
            by_level[level] = sum(right) / len(right)
    return Point(policy, sum(c for c, _ in outcomes) / len(outcomes), sum(u for _, u in outcomes) / len(outcomes),
                 by_level)
