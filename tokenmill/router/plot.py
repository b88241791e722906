"""The `router calibrate --plot` PNG: quality against cost per item for each model and each routing policy."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server

import matplotlib.pyplot as plt  # noqa: E402

from tokenmill.router.curve import Point  # noqa: E402


def plot_curve(points: Sequence[Point], best: Point | None, target: float, path: Path) -> None:
    """The cascade's curve over its thresholds, the single models and `cheapest`, the target and the best threshold."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    cascade = sorted((p for p in points if p.policy == "cascade"), key=lambda p: (p.cost_usd, p.quality))
    micro = 1e6  # USD per item are millionths of a dollar on these models; plotted in micro-USD to stay readable
    ax.plot([p.cost_usd * micro for p in cascade], [p.quality for p in cascade], "-o", markersize=3,
            color="tab:blue", label="cascade (each point a threshold)")
    for p in points:
        if p.policy != "cascade":
            marker, size = ("D", 6) if p.policy == "cheapest" else ("s", 10)  # cheapest often sits on the first model
            ax.plot(p.cost_usd * micro, p.quality, marker, markersize=size, label=p.policy)
    ax.axhline(target, color="gray", linestyle="--", label=f"target quality {target:.3f}")
    if best is not None:
        ax.plot(best.cost_usd * micro, best.quality, "*", markersize=18, markerfacecolor="none",
                markeredgecolor="tab:red", markeredgewidth=1.5, label=f"best cascade: threshold {best.threshold:.3g}")
    ax.set_xlabel("cost per item (micro-USD)")
    ax.set_ylabel("quality (fraction right)")
    ax.set_title("router calibration: quality against cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
