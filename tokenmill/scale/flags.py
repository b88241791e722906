"""`serve`'s flags for replicas on Ray Serve, and the check that Ray is there before any model loads."""

import argparse
import importlib

from tokenmill.errors import InvalidRequestError
from tokenmill.scale.config import ROUTINGS, ScaleConfig


def add_scale_flags(parser: argparse.ArgumentParser) -> None:
    """--replicas, --ray-address, --routing and the autoscaling bounds, with ScaleConfig's defaults."""
    d = ScaleConfig
    parser.add_argument("--replicas", type=int, default=None,
                        help="serve with this many engine replicas on Ray Serve (needs `pip install "
                             "tokenmill[ray]`; default: one engine in this process, without Ray)")
    parser.add_argument("--ray-address", default=d.ray_address,
                        help="with --replicas, join this Ray cluster (default: start a local Ray in-process)")
    parser.add_argument("--routing", choices=ROUTINGS, default=d.routing,
                        help="with --replicas, send a request to the replica holding its prompt prefix (prefix) "
                             "or by Ray Serve's power of two choices (default) (default: %(default)s)")
    parser.add_argument("--min-replicas", type=int, default=d.min_replicas,
                        help="autoscale down to this many replicas; 0 scales to zero when idle (default: off)")
    parser.add_argument("--max-replicas", type=int, default=d.max_replicas,
                        help="autoscale up to this many replicas (default: off)")
    # These three default to None, not ScaleConfig's values, so that one given without a bound can be refused.
    parser.add_argument("--target-ongoing-requests", type=float,
                        help=f"autoscaling aims at this many ongoing requests per replica "
                             f"(default: {d.target_ongoing_requests})")
    parser.add_argument("--upscale-delay", type=float, metavar="SECONDS",
                        help=f"load must call for more replicas this long before they start "
                             f"(default: {d.upscale_delay})")
    parser.add_argument("--downscale-delay", type=float, metavar="SECONDS",
                        help=f"load must call for fewer replicas this long before they stop "
                             f"(default: {d.downscale_delay})")


def scale_config(args: argparse.Namespace) -> ScaleConfig | None:
    """The ScaleConfig those flags describe, or None for single-process serving; checks Ray is installed."""
    tuning = {name: getattr(args, name) for name in ("target_ongoing_requests", "upscale_delay", "downscale_delay")
              if getattr(args, name) is not None}
    if args.replicas is None:
        if args.min_replicas is not None or args.max_replicas is not None or args.ray_address is not None or tuning:
            raise InvalidRequestError("--min-replicas, --max-replicas, --ray-address, --target-ongoing-requests and "
                                      "the scaling delays need --replicas N")
        return None
    if tuning and args.min_replicas is None and args.max_replicas is None:
        raise InvalidRequestError("--target-ongoing-requests and the scaling delays tune autoscaling: give "
                                  "--min-replicas or --max-replicas too")
    config = ScaleConfig(args.replicas, args.ray_address, args.routing, args.min_replicas, args.max_replicas,
                         **tuning)
    require_ray()
    return config


def require_ray(needed_by: str = "--replicas runs engine replicas on Ray Serve",
                instead: str = "drop --replicas to serve from this process") -> None:
    """Raise InvalidRequestError saying how to install Ray Serve when it is missing."""
    try:
        importlib.import_module("ray.serve")
    except ImportError as exc:
        raise InvalidRequestError(f"{needed_by}, which is not installed ({exc}); install it with "
                                  f"`pip install 'tokenmill[ray]'`, or {instead}") from exc
