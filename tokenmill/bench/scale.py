"""`tokenmill bench scale routing|autoscale`: the Ray Serve benchmarks of tokenmill/scale/bench.py, Ray imported on run.

    tokenmill bench scale routing     # same run, same workload: prefix routing, then Ray Serve's default
    tokenmill bench scale autoscale   # a load step up and down, then scale to zero and a cold start
"""

import argparse

from tokenmill.config import EngineConfig
from tokenmill.scale.flags import require_ray


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench scale` flags."""
    parser.add_argument("benchmark", choices=("routing", "autoscale"))
    parser.add_argument("--model", default=EngineConfig.model)
    parser.add_argument("--port", type=int, default=8765, help="where Ray Serve's HTTP proxy listens")
    routing = parser.add_argument_group("routing")
    routing.add_argument("--replicas", type=int, default=2)
    routing.add_argument("--groups", type=int, default=8, help="prompt groups, each sharing a document")
    routing.add_argument("--per-group", type=int, default=4)
    routing.add_argument("--prefix-words", type=int, default=300)
    routing.add_argument("--concurrency", type=int, default=4)
    routing.add_argument("--max-tokens", type=int, default=4)
    autoscale = parser.add_argument_group("autoscale")
    autoscale.add_argument("--upscale-delay", type=float, default=5, metavar="SECONDS")
    autoscale.add_argument("--downscale-delay", type=float, default=15, metavar="SECONDS")
    autoscale.add_argument("--load-seconds", type=float, default=45,
                           help="how long 8 clients send back to back before the load stops")


def main(args: argparse.Namespace) -> int:
    """Run one benchmark (each prints JSON lines); without Ray Serve installed, say how to install it."""
    require_ray("`bench scale` measures replicas on Ray Serve", "run `tokenmill bench serve` against one process")
    from tokenmill.scale import bench

    {"routing": bench.routing, "autoscale": bench.autoscale}[args.benchmark](args)
    return 0
