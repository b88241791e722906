"""Settings of `serve --replicas`: how many engine replicas, where Ray runs, how requests and replicas are spread."""

from dataclasses import dataclass
from typing import Any

from tokenmill.errors import InvalidRequestError

ROUTINGS = ("prefix", "default")

# NOTE: how fresh Ray Serve's load figure is, which the delays count from. Ray 2.60's handles push their
# ongoing-request samples to the controller every `metrics_interval_s` (10 s by default; the
# RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S variables it names as successors are read nowhere yet), and
# the controller averages the samples of the last `look_back_period_s` (30 s). With the defaults a 5 s upscale
# delay acted at 26 s of load and a 15 s downscale delay 45 s after it stopped (16 s and 26 s with a 5 s
# look-back). Pushed every 0.5 s and averaged over 2 s: 5.9 s and 16.4 s (docs/benchmarks.md), the delays
# alone deciding how long a need must last. metrics_interval_s is marked deprecated, but nothing replaces it
# yet; the look-back must exceed it.
AUTOSCALING_METRICS = {"metrics_interval_s": 0.5, "look_back_period_s": 2.0}


@dataclass(frozen=True)
class ScaleConfig:
    """Replica count, Ray cluster, routing policy and, when min or max replicas is set, autoscaling."""

    replicas: int
    # None starts a local Ray inside the serving process; an address ("auto", "ray://host:10001") joins a cluster.
    ray_address: str | None = None
    # `prefix`: routing.py's prefix-aware rule; `default`: Ray Serve's power of two choices (for comparison).
    routing: str = "prefix"
    # Autoscaling is on when either bound is set; the other defaults to `replicas`. 0 scales to zero when idle.
    min_replicas: int | None = None
    max_replicas: int | None = None
    # Ongoing requests per replica the autoscaler aims at; Ray Serve's default is 2, which on a CPU engine that
    # batches would add replicas long before one is full.
    target_ongoing_requests: float = 8.0
    # Seconds a need for more (fewer) replicas must last before replicas are added (removed); Ray Serve's defaults.
    upscale_delay: float = 30.0
    downscale_delay: float = 600.0

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise InvalidRequestError(f"routing={self.routing!r} must be one of {', '.join(ROUTINGS)}")
        if self.replicas < 1 and (not self.autoscaling or self.highest < 1):
            # The way to zero replicas names both bounds: --min-replicas 0 alone leaves the most at --replicas, 0.
            raise InvalidRequestError(f"--replicas {self.replicas} must be at least 1 (to scale to zero when idle, "
                                      f"set --min-replicas 0 --max-replicas N)")
        if self.autoscaling and not self.lowest <= self.replicas <= self.highest:
            raise InvalidRequestError(f"--replicas {self.replicas} must lie in [--min-replicas {self.lowest}, "
                                      f"--max-replicas {self.highest}]")
        if self.lowest < 0 or self.highest < 1:
            raise InvalidRequestError("--min-replicas must be >= 0 and --max-replicas >= 1")
        if not (self.target_ongoing_requests > 0 and self.upscale_delay >= 0 and self.downscale_delay >= 0):  # NaN
            raise InvalidRequestError("--target-ongoing-requests must be > 0, and the scaling delays >= 0")

    @property
    def autoscaling(self) -> bool:
        """True when Ray Serve should add and remove replicas with load."""
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def lowest(self) -> int:
        """The fewest replicas autoscaling may leave."""
        return self.replicas if self.min_replicas is None else self.min_replicas

    @property
    def highest(self) -> int:
        """The most replicas autoscaling may start."""
        return self.replicas if self.max_replicas is None else self.max_replicas

    def deployment_options(self) -> dict[str, Any]:
        """The replica count part of the engine deployment's options: a fixed num_replicas or autoscaling_config."""
        if not self.autoscaling:
            return {"num_replicas": self.replicas}
        return {"autoscaling_config": {
            "min_replicas": self.lowest, "max_replicas": self.highest, "initial_replicas": self.replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay, "downscale_delay_s": self.downscale_delay,
            **AUTOSCALING_METRICS,
        }}
