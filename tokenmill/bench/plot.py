"""The `--plot` PNG: latency distributions and output throughput over a benchmark run."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tokenmill.bench.metrics import RequestResult  # noqa: E402


def plot_run(results: list[RequestResult], duration: float, path: Path) -> None:
    """Histograms of TTFT, TPOT, ITL and end-to-end latency, and output tokens/s per second of the run."""
    ok = [r for r in results if r.success]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    series = [
        ("time to first token (ms)", [r.ttft * 1000 for r in ok]),
        ("time per output token (ms)", [t * 1000 for r in ok if (t := r.tpot) is not None]),
        ("inter-token latency (ms)", [gap * 1000 for r in ok for gap in r.itls]),
        ("end-to-end latency (ms)", [r.e2e * 1000 for r in ok]),
    ]
    for ax, (title, values) in zip(axes.flat, series):
        ax.hist(values, bins=30, color="tab:blue")
        ax.set_title(title)
        ax.set_ylabel("count")
    seconds = np.arange(int(np.ceil(duration)) + 1)
    tokens = np.zeros(len(seconds))
    for r in ok:  # spread a request's tokens over its chunks (a chunk may carry several)
        for t in r.chunk_times:
            tokens[int(t)] += r.output_tokens / len(r.chunk_times)
    throughput, concurrency = axes.flat[4], axes.flat[5]
    throughput.plot(seconds, tokens, color="tab:green")
    throughput.set_title("output tokens/s over the run")
    throughput.set_xlabel("second")
    in_flight = [sum(r.start <= s < (r.end or duration) for r in results) for s in seconds]
    concurrency.step(seconds, in_flight, where="post", color="tab:orange")
    concurrency.set_title("requests in flight")
    concurrency.set_xlabel("second")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
